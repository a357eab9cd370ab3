"""Repair functions named in the config (`transformers: ["module:function", ...]`).

Why: a fix for drifted records must be deployable without a new package release — put a
module on PYTHONPATH, name its function in the config, then redrive. Each function takes the
upgraded body (dict) and returns the repaired body; they run in order, before validation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from ingest.errors import ConfigError

Repair = Callable[[dict[str, Any]], dict[str, Any]]


def load_extra(specs: Sequence[str]) -> list[Repair]:
    """Import every "module:function"; a spec that cannot be used is a ConfigError naming
    `transformers[i]`, so the service (or redrive) refuses to start instead of skipping it."""
    out: list[Repair] = []
    for i, spec in enumerate(specs):
        key = f"transformers[{i}]"
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ConfigError(key, f"'{spec}' is not 'module:function'")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or the module itself failing to import
            raise ConfigError(key, f"cannot import module '{module_name}': {exc}") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise ConfigError(key, f"module '{module_name}' has no function '{attr}'")
        out.append(fn)
    return out
