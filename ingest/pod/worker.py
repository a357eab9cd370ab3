"""One worker process of a pod: a whole pipeline (all sources, its share of their work).

Forked by the pod's fork server at the control plane's request (`ingest.pod.spawn`), with the
control plane's environment as of the request, its index in INGEST_POD_WORKER ("i/n"), the
control socket in INGEST_POD_SOCKET and the pod's effective configuration as JSON (an argument
sent over the fork server's pipe, so secrets never sit in the environment). It builds the
service as worker i of n (see `ingest.service.build_sources`: leases, consumer group, intake
partitions), reports to the control plane, applies the modes it is sent, and on SIGTERM drains
and exits 0 like a single-process service. It dies with the pod (PR_SET_PDEATHSIG on the fork
server, which exits with the control plane): a killed pod never leaves workers behind to race
its restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

from ingest.config import Config
from ingest.logctx import setup_logging
from ingest.pod import ipc
from ingest.pod.ipc import ENV_SOCKET, ENV_WORKER
from ingest.pod.metrics import dump

log = logging.getLogger(__name__)
PROGRESS_SECONDS = 0.25
REPORT_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1
BUILD_CANCEL_SECONDS = 5.0  # a build stopped by SIGTERM gets so long to unwind
T = TypeVar("T")


def die_with_parent(fork_server: int, control_plane: int) -> None:
    """SIGKILL this process when its parent, the fork server, dies, however it dies; the fork
    server exits as soon as the control plane is gone (`ingest.pod.spawn`).

    PR_SET_PDEATHSIG watches whoever is the parent when it is set: a fork server that died
    between the fork and this call has already handed the worker to init (or a subreaper), and
    a parent read here would be that one. So the parent is compared with the fork server's pid
    as the control plane knew it when it asked for the fork (`fork_server`), after prctl: a
    worker orphaned before then exits at once instead of running beside its replacement."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != fork_server or not _alive(control_plane):  # gone before prctl
        os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - alive, someone else's
        pass
    return True


async def run(cfg: Config, index: int, count: int, socket_path: str) -> int:
    from ingest.service import GC_YOUNG_THRESHOLD_WORKER, Service, tune_gc, tune_threads

    tune_gc(GC_YOUNG_THRESHOLD_WORKER)
    tune_threads()
    # SIGTERM drains from here on (before, `ingest.pod.spawn` exits 0: nothing was open). One
    # received while the service is built stops the build (nothing is read or written before
    # `start`), exit 0; one received while it starts ends it right after, drained, exit 0.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = await _build_unless_stopped(Service.build(cfg, shard=(index, count)), stop)
    if service is None:
        return 0
    service.worker = f"{service.worker}/w{index}"
    await service.start()
    reader, writer = await asyncio.open_unix_connection(socket_path, limit=ipc.LIMIT)
    await ipc.send(writer, {"type": "hello", "index": index, "pid": os.getpid()})

    async def progress() -> dict[str, Any]:
        return {
            "type": "progress",
            "pending": service.pending,
            "in_flight": service.admission.in_flight_count,
            "state": service.admission.state.value,
            "intake_committed": service.intake_committed(),
        }

    async def full_report() -> None:
        service.refresh_gauges()
        await ipc.send(writer, await progress())
        health = await service.health()
        metrics = dump(service.metrics.registry)
        await ipc.send(writer, {"type": "report", "health": health, "metrics": metrics})

    async def report() -> None:
        ticks = 0
        while True:
            if ticks % round(REPORT_SECONDS / PROGRESS_SECONDS) == 0:
                await full_report()
            else:
                await ipc.send(writer, await progress())
            ticks += 1
            await asyncio.sleep(PROGRESS_SECONDS)

    async def commands() -> None:
        while (msg := await ipc.recv(reader)) is not None:
            kind = msg.get("type")
            if kind == "control":
                service.admission.apply_control(msg["control"])
            elif kind == "notify":
                service.notify_webhook()
            elif kind == "report_now":  # a scrape or health read on the control plane
                await full_report()
        log.warning("control plane gone: draining and exiting")
        stop.set()

    tasks = [asyncio.create_task(report()), asyncio.create_task(commands())]
    await stop.wait()
    await service.shutdown()
    for task in tasks:
        task.cancel()
    with contextlib.suppress(Exception):  # last word: what it counted while draining
        service.refresh_gauges()
        await ipc.send(writer, await progress())
        metrics = dump(service.metrics.registry)
        await ipc.send(writer, {"type": "report", "health": None, "metrics": metrics})
        writer.close()
    return 0


async def _build_unless_stopped(build: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`build`, or None when `stop` is set first: the build is cancelled (a store that does not
    answer kept a worker building until the SIGKILL at drain + 10 s). A build that does not end
    within BUILD_CANCEL_SECONDS of its cancel is left to the process's exit."""
    building = asyncio.ensure_future(build)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({building, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if building.done():
        return building.result()
    log.warning("stopped while building the service: nothing was started, exiting")
    building.cancel()
    await asyncio.wait({building}, timeout=BUILD_CANCEL_SECONDS)
    if not building.done():
        log.error("the service's build did not stop within %.0fs; exiting", BUILD_CANCEL_SECONDS)
        logging.shutdown()
        os._exit(0)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        building.result()
    return None


def forked(config_json: str) -> None:
    """The worker, in a child of the pod's fork server, its environment set and its parent
    checked (`ingest.pod.spawn._worker`)."""
    index, count = (int(x) for x in os.environ[ENV_WORKER].split("/"))
    cfg = Config.model_validate_json(config_json)
    setup_logging(os.environ.get("INGEST_LOG_LEVEL", "INFO"), cfg.logging.format)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    sys.exit(asyncio.run(run(cfg, index, count, os.environ[ENV_SOCKET])))
