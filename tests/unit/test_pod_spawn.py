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
    """What the fork server preloads for `cfg`."""
    return preload_modules(cfg)


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


def test_a_forked_child_does_not_run_the_main_module_again(tmp_path: Path) -> None:
    """The fork server's children skip multiprocessing's re-run of the parent's main module
    (the CLI: ~0.15-0.35 s of imports the fork server paid for nothing), and are forked with
    the garbage collector off (the fork server's imports ran without collections; a worker
    freezes what it inherited, then turns it on: `ingest.pod.spawn._worker`)."""
    marker = tmp_path / "main-ran"
    script = tmp_path / "main.py"
    script.write_text(
        "import multiprocessing, pathlib, sys\n"
        "if __name__ != '__main__':\n"
        f"    pathlib.Path({str(marker)!r}).write_text(__name__)\n"
        "else:\n"
        "    ctx = multiprocessing.get_context('forkserver')\n"
        "    ctx.set_forkserver_preload(['ingest.pod.fork_server'])\n"
        "    code = 'import gc, sys; sys.exit(3 if gc.isenabled() else 0)'\n"
        "    p = ctx.Process(target=exec, args=(code,))\n"
        "    p.start()\n"
        "    p.join()\n"
        "    sys.exit(p.exitcode)\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert not marker.exists(), f"the child ran the main module as {marker.read_text()}"
    assert out.returncode == 0, (out.returncode, out.stderr)
