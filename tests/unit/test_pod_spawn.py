"""What a pod's fork server imports before it forks workers (ingest/pod/spawn.py).

Each configured source, sink and store names a module that exists (a wrong name would only be
skipped by the fork server, and every worker would import it itself again); and importing every
module it may preload leaves the process with one thread, so forking it is safe.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
import typing
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import pytest

from ingest import config as C
from ingest.pod import spawn
from ingest.pod.spawn import preload_modules

ROOT = Path(__file__).resolve().parents[2]


def members(union: object) -> list[typing.Any]:
    return list(typing.get_args(typing.get_args(union)[0]))


def every_config() -> list[C.Config]:
    """One config per source kind (webhooks with each intake), with every sink, both states
    (built unvalidated: only the kinds matter here)."""
    sinks = [m.model_construct() for m in members(C.SinkConfig)]
    sources = [m.model_construct() for m in members(C.SourceConfig)]
    sources.append(C.WebhookSourceConfig.model_construct(intake="kafka"))
    states = [m.model_construct() for m in members(C.StateConfig)]
    return [
        C.Config.model_construct(state=state, sources=[src], sinks=sinks)
        for src in sources
        for state in states
    ]


def named(cfg: C.Config) -> list[str]:
    """What the fork server preloads for `cfg` but the running program's main module."""
    mods = preload_modules(cfg)
    return [m for i, m in enumerate(mods) if i != 1]


def test_every_preloaded_module_exists() -> None:
    configs = every_config()
    assert len({sc.type for cfg in configs for sc in cfg.sources}) == 5
    for cfg in configs:
        for mod in named(cfg):
            assert importlib.util.find_spec(mod) is not None, mod


def test_importing_what_the_fork_server_may_preload_starts_no_thread() -> None:
    mods = sorted({m for cfg in every_config() for m in named(cfg)})
    code = (
        f"import os, threading\nfor m in {mods!r}: __import__(m)\n"
        "print(threading.active_count(), len(os.listdir('/proc/self/task')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["1", "1"], (mods, out.stdout, out.stderr)


def test_a_fork_server_pid_that_cannot_be_read_fails_the_start_saying_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fork server's pid comes from a private name of multiprocessing. Read with `or 0`,
    a Python without it started every worker with pid 0: each exited 1 at once (its parent is
    not pid 0) and was started again, in a loop, with no error. Now the start raises."""
    started: list[tuple[Any, ...]] = []

    class Proc:
        def __init__(self, target: Any, args: tuple[Any, ...], name: str) -> None:
            started.append(args)

        def start(self) -> None:
            pass

    monkeypatch.setattr(forkserver, "ensure_running", lambda: None)
    monkeypatch.setattr(forkserver, "_forkserver", types.SimpleNamespace())
    monkeypatch.setattr(spawn, "_CONTEXT", types.SimpleNamespace(Process=Proc))
    with pytest.raises(RuntimeError, match="_forkserver_pid is None"):
        spawn._start("{}", {})
    assert started == []
