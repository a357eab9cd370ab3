"""Preloaded by a fork server that `ingest run` started before reading its config
(`ingest.pod.prestart`): reads the config as the control plane is about to, and imports what a
worker of it needs (`ingest.pod.spawn.preload_modules`), or nothing when it is no pod.

Nothing raised here may end the fork server (multiprocessing skips only an ImportError): a
config that does not load is the control plane's to report, and its workers then import
what they need after their fork.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ingest.pod.prestart import ENV_CONFIG


def preload() -> list[str]:
    """The modules imported (none when the config does not load or is one process)."""
    path = os.environ.pop(ENV_CONFIG, None)
    if path is None:
        return []
    try:
        from ingest.config import load_config
        from ingest.pod.spawn import preload_modules

        cfg = load_config(Path(path) if path else None)
        if cfg.worker_count() <= 1:
            return []
        names = preload_modules(cfg)
    except Exception:  # the control plane reports it
        return []
    done = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # the worker imports it again and fails there
            continue
        done.append(name)
    return done


preload()
