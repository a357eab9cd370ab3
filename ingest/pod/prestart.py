"""`ingest run`'s first step: a pod's fork server started before the CLI's own imports.

A pod's first record waits for its fork server's imports (~0.8 s of CPU for an S3 pod). They
used to start once the control plane had imported its CLI (typer, click, rich), pydantic and
the config models and read its config: ~0.4 s of CPU first, with the other core idle. Started
first thing instead, they run beside those. The modules to import follow from the config, not
read yet: the fork server reads it itself (`ingest.pod.preload`: the same file, the same
environment) and imports what `ingest.pod.spawn.preload_modules` names for it, or nothing for a
single-process service. `ingest run` then starts the fork server as before
(`ingest.pod.spawn.start_fork_server`: running already, that changes nothing), or stops it when
the service turns out to be one process (`stop_early`).

Only the preload depends on what is parsed here: a path read differently from the CLI's own
parsing (which stays the authority) costs the workers' imports after their fork, nothing else.
Kept light: it runs before anything else is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from multiprocessing import forkserver, resource_tracker

ENV_CONFIG = "INGEST_FORK_SERVER_CONFIG"  # the config path for `ingest.pod.preload` ("": none)
PRELOAD = ["ingest.pod.fork_server", "ingest.pod.preload"]
_started = [False]


def config_option(args: list[str]) -> str | None:
    """`run`'s --config / -c value as click parses it, or None when not given."""
    for i, arg in enumerate(args):
        if arg == "--":
            return None
        if arg in ("--config", "-c"):
            return args[i + 1] if i + 1 < len(args) else None
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg.startswith("-c") and not arg.startswith("--"):
            return arg[2:]
    return None


def start_early(argv: list[str]) -> bool:
    """Start the fork server now if `argv` is an `ingest run` that may run a pod; whether it
    did. Not for `--help`, nor with INGEST_WORKERS=1 (one process: nothing to fork)."""
    args = argv[1:]
    if not args or args[0] != "run" or "--help" in args or os.environ.get("INGEST_WORKERS") == "1":
        return False
    path = config_option(args[1:])
    if path is None:
        path = os.environ.get("INGEST_CONFIG", "")
    os.environ[ENV_CONFIG] = path
    try:
        forkserver.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
    finally:
        del os.environ[ENV_CONFIG]  # the fork server's copy is what it reads
    _started[0] = True
    return True


def stop_early() -> None:
    """Stop a fork server `start_early` started (the service is one process), and the
    resource tracker multiprocessing started with it: no child is left. It forked nothing;
    it may still be importing, and blocks SIGTERM: SIGKILL."""
    if not _started[0]:
        return
    _started[0] = False
    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if isinstance(pid, int) and pid > 0:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        server._stop()  # type: ignore[union-attr]  # closes its pipes, reaps it
    with contextlib.suppress(Exception):  # and the tracker ensure_running started with it
        resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


def main_is_cli(module_name: str) -> bool:
    """Whether the CLI module being imported is the program (`python -m ingest.cli.ingest`,
    or the `ingest` console script), not a module imported by another program (tests)."""
    return module_name == "__main__" or os.path.basename(sys.argv[0]) == "ingest"
