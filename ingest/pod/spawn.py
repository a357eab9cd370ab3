"""How a pod starts its workers: forks of a fork server that imported their code once.

A worker's start-up is mostly imports: for an S3 pod ~3 s of CPU (aiobotocore, redis, asyncpg,
pydantic; docs/benchmarks.md). Started as `python -m ingest.pod.worker`, each of N workers paid
them, competing with each other and with the control plane for the cores. Now the control
plane starts a fork server (multiprocessing's "forkserver" start method) as early as `ingest
run` knows it runs a pod (`start_fork_server`): a fresh interpreter that imports, once, the
modules a worker of this configuration needs (`preload_modules`: the sources, sinks and stores
configured, nothing else) while the control plane goes on with its own start-up. Every worker,
and every restart of one, is a fork of it (`start_worker`), its code already loaded.

Fork safety: the fork server is spawned (exec'd), not forked from the control plane, and does
nothing but import; no event loop, thread, socket or librdkafka handle exists in it when it
forks (multiprocessing closes its own listener and pipes in the child). A worker opens its
loop, connections and clients after the fork, as it did when exec'd. Modules imported there
must not start threads or open connections at import time (none does; a test checks).

Dying with the pod: a worker's parent is the fork server, which blocks SIGTERM (a SIGTERM to
the process group must drain the workers, not kill their parent: `ingest.pod.fork_server`) and
exits as soon as the control plane is gone (EOF on the pipe only the control plane holds: the
worker closes its inherited copy, `leave_fork_server`); the worker dies with its parent by
PR_SET_PDEATHSIG (`ingest.pod.worker.die_with_parent`), armed first thing in the child and
checked against the fork server's pid as this process knew it when it asked for the fork.
The fork server tells the control plane each worker's exit status, as waitpid would
(`WorkerProcess.wait`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import importlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing import forkserver
from multiprocessing import process as mp_process
from multiprocessing.process import BaseProcess
from typing import Any

from ingest import config as C
from ingest.pod.ipc import ENV_PARENT, ENV_WORKER

log = logging.getLogger(__name__)
_CONTEXT = multiprocessing.get_context("forkserver")
# Named, as `python -m ingest.pod.worker` named it: the worker imports the service, which
# imports the control plane, which imports this module.
WORKER_MODULE = "ingest.pod.worker"
FORK_SERVER_MODULE = "ingest.pod.fork_server"  # first: the fork server blocks SIGTERM


def preload_modules(cfg: C.Config) -> list[str]:
    """What a worker of `cfg` imports before it is ready, by module name: only what its
    configured sources, sinks and stores need (an S3 client is not loaded for a Kafka pod).

    Not the control plane's main module (the CLI: typer, click, rich, ~0.15-0.35 s of the fork
    server's CPU on the path to the first fork): a worker never runs it, and its children do
    not run it again either (`ingest.pod.fork_server`)."""
    mods = [FORK_SERVER_MODULE, WORKER_MODULE, "ingest.service"]
    if isinstance(cfg.state, C.ProductionStateConfig):
        mods += ["ingest.state.postgres", "ingest.state.redis", "ingest.state.leases"]
    else:
        mods += ["ingest.state.sqlite", "ingest.state.sqlite_idem", "ingest.state.leases"]
    for sc in cfg.sources:
        if isinstance(sc, C.WebhookSourceConfig):
            mods.append("ingest.webhook.source")
            intake = ("ingest.webhook.kafka", "ingest.sources.kafka")
            mods += intake if sc.intake == "kafka" else ("ingest.webhook.sqlite",)
        else:
            mods.append(f"ingest.sources.{sc.type}")
            if sc.type == "s3":  # its models parsed once, not in each worker
                mods.append("ingest.sources.s3_preload")
    mods += [f"ingest.sinks.{sk.type}" for sk in cfg.sinks]
    return list(dict.fromkeys(mods))


def start_fork_server(cfg: C.Config) -> None:
    """Start the fork server now (idempotent): its imports run beside the caller's."""
    _CONTEXT.set_forkserver_preload(preload_modules(cfg))
    forkserver.ensure_running()


def leave_fork_server() -> None:
    """In a worker: close its copy of the fork server's 'alive' pipe, which multiprocessing
    hands every child so that it could fork in turn. Held by a worker, it would keep the fork
    server (the worker's parent) alive after the control plane died, and the worker with it."""
    server: Any = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None


# Process.start() polls every child multiprocessing knows (its `_cleanup`), which reads an ended
# child's exit status off its pipe: never beside `WorkerProcess._ended` reading the same.
_lock = threading.Lock()


class WorkerProcess:
    """A forked worker as the control plane sees it: pid, returncode, wait, signals (the part
    of `asyncio.subprocess.Process` the pod uses)."""

    def __init__(self, proc: BaseProcess) -> None:
        self._proc = proc
        self.pid: int = proc.pid  # type: ignore[assignment]
        self.returncode: int | None = None
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] = loop.create_future()
        self._sentinel = proc.sentinel
        loop.add_reader(self._sentinel, self._ended)

    def _ended(self) -> None:
        """The fork server wrote the exit status (or went away: 255)."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sentinel)
        if not _lock.acquire(blocking=False):  # a start is polling this process right now
            loop.call_later(0.05, self._ended)
            return
        try:
            code = self._proc.exitcode
            if code is not None:
                self._proc.close()  # its status pipe; multiprocessing forgets it
                _running.discard(self._proc)
        finally:
            _lock.release()
        self.returncode = 255 if code is None else code
        if not self._done.done():
            self._done.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._done)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _stop_before_start(signum: int, frame: Any) -> None:
    os._exit(0)


def _worker(config_json: str, env: dict[str, str], fork_server: int) -> None:
    """In the forked child: dying with its parent first (`fork_server`, the parent it was
    forked by as the control plane saw it), then SIGTERM as usual, the control plane's
    environment, the worker."""
    gc.freeze()  # what the fork server imported: never scanned here (`ingest.pod.fork_server`)
    gc.enable()
    worker = importlib.import_module(WORKER_MODULE)
    worker.die_with_parent(fork_server, int(env[ENV_PARENT]))
    # The fork server blocks SIGTERM; one sent since is delivered once unblocked. Until the
    # worker's loop takes SIGTERM over (its drain, `ingest.pod.worker.run`), nothing is open
    # or read: a SIGTERM then is a stop with nothing to drain, exit 0 like a drained worker.
    signal.signal(signal.SIGTERM, _stop_before_start)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.environ.clear()
    os.environ.update(env)
    leave_fork_server()
    worker.forked(config_json)


def _fork_server_pid() -> int:
    """The running fork server's pid. No public API gives it: multiprocessing's private
    `_forkserver._forkserver_pid` (CPython 3.11-3.13). Should a Python change that, every
    worker started with a pid of 0 exited 1 at once (`die_with_parent`: its parent is not
    pid 0), restarted in a loop with no error; now the start fails, saying why."""
    server: Any = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise RuntimeError(
            "cannot start a worker: the pod's fork server's pid is not known "
            f"(multiprocessing.forkserver._forkserver._forkserver_pid is {pid!r} on Python "
            f"{sys.version.split()[0]}; ingest.pod.spawn reads that private name); run the pod "
            "with workers: 1 (INGEST_WORKERS=1) until ingest is updated for this Python"
        )
    return pid


def _start(config_json: str, env: dict[str, str]) -> BaseProcess:
    """Fork a worker (blocking: the fork server may still be importing)."""
    with _lock:
        forkserver.ensure_running()  # start() does the same: a fork server gone is started again
        fork_server = _fork_server_pid()
        proc = _CONTEXT.Process(
            target=_worker,
            args=(config_json, env, fork_server),
            name=f"ingest-worker-{env.get(ENV_WORKER, '')}",
        )
        proc.start()
        # Not multiprocessing's to stop at exit (it would SIGTERM a daemon and join every
        # child with no timeout: a stuck worker hung the control plane's exit): ours.
        mp_process._children.discard(proc)  # type: ignore[attr-defined]
        _running.add(proc)
    return proc


# Workers started and not yet seen ended, and how long they get to drain should the control
# plane exit without its shutdown (`stop_workers_at_exit`).
_running: set[BaseProcess] = set()
_exit_timeout = [70.0]
_LOCK_WAIT = 5.0  # the exit handler's wait for a worker start in flight


def stop_workers_at_exit() -> None:
    """Every exit of the control plane stops its workers within the pod's shutdown timeout:
    one without `Pod.shutdown` (`serve` failed after the workers started, say) SIGTERMs the
    workers still running (they drain, exit 0), waits up to that timeout, then SIGKILLs what
    is left. Registered with atexit when the first worker starts."""
    # A start in flight holds the lock while a frozen fork server never answers it: not waited
    # for past _LOCK_WAIT (its thread is a daemon; what it has started is in _running).
    locked = _lock.acquire(timeout=_LOCK_WAIT)
    try:
        procs = [p for p in list(_running) if p.is_alive()]
        if not procs:
            return
        timeout = _exit_timeout[0]
        log.error(
            "%d worker(s) still running as the control plane exits: stopping them (SIGTERM,"
            " SIGKILL after %.0fs)",
            len(procs),
            timeout,
        )
        for p in procs:
            with contextlib.suppress(OSError):
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                with contextlib.suppress(OSError):
                    p.kill()
                p.join(5)
    finally:
        if locked:
            _lock.release()


async def start_worker(env: dict[str, str], cfg: C.Config, exit_timeout: float) -> WorkerProcess:
    """Fork a worker with environment `env` and the effective configuration `cfg` (as JSON, an
    argument: never in the environment, it holds secrets). `exit_timeout`: what the worker gets
    to drain should the control plane exit without a shutdown (`stop_workers_at_exit`)."""
    if not _running:
        atexit.unregister(stop_workers_at_exit)
        atexit.register(stop_workers_at_exit)
    _exit_timeout[0] = exit_timeout
    # start() waits for the fork server to fork, which comes after its imports: not on the loop,
    # and not in asyncio's thread pool, which the loop's close waits for with no timeout (a
    # frozen fork server kept the control plane from exiting, and from stopping its workers)
    loop = asyncio.get_running_loop()
    started: asyncio.Future[BaseProcess] = loop.create_future()
    config_json = cfg.model_dump_json()

    def answer(proc: BaseProcess | None, exc: BaseException | None) -> None:
        if started.done():
            return
        if exc is not None:
            started.set_exception(exc)
        else:
            started.set_result(proc)  # type: ignore[arg-type]

    def run() -> None:
        try:
            proc = _start(config_json, env)
        except BaseException as exc:  # handed to the awaiting task
            result: tuple[BaseProcess | None, BaseException | None] = (None, exc)
        else:
            result = (proc, None)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(answer, *result)

    threading.Thread(target=run, name="ingest-worker-start", daemon=True).start()
    return WorkerProcess(await started)
