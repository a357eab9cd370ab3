"""A pod's control plane: N worker processes under one HTTP listener, one health, one /metrics.

With `workers` > 1, `ingest run` becomes this process. It owns what must be one per pod: the
HTTP listener (webhooks, admin, health, metrics), the webhook intake's writer and its
closed-loop bound (`Admission.intake`), the operator modes; and it runs N worker processes
(`ingest.pod.worker`, forked by a fork server that imported their code once:
`ingest.pod.spawn`), each a full pipeline taking its share of the work through what already
divides it: Kafka partitions in one consumer group, S3/SFTP/inbox leases, webhook intake
partitions by tenant. Workers report over a Unix socket (`ingest.pod.ipc`); the control plane
sends them the modes (paused, drain, brownout rate) and wakes them on new webhook bodies.

A worker that dies is started again (backoff 0.5 s doubling to 10 s) and shows in
/health/detailed `.workers` (restarts, last exit) and `ingest_worker_restarts_total`; its
counters stay in /metrics. SIGTERM drains every worker (each exits 0), then the pod exits 0.
Workers die with the control plane (PR_SET_PDEATHSIG on the fork server, which exits with it),
so a kill -9 of the pod never leaves one behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest import config as C
from ingest.errors import IngestError
from ingest.pipeline.admission import Admission, BackpressureState
from ingest.pipeline.control import ControlFollower
from ingest.pod import ipc
from ingest.pod.fleet import PodFleet
from ingest.pod.health import (
    first_stores,
    merge_adapters,
    merge_disk,
    merge_problems,
    merge_sinks,
    worst_status,
)
from ingest.pod.ipc import ENV_PARENT, ENV_SOCKET, ENV_WORKER
from ingest.pod.metrics import Dump, PodMetrics, add_dumps
from ingest.pod.spawn import WorkerProcess, start_fork_server, start_worker

log = logging.getLogger(__name__)
TICK_SECONDS = 0.25
START_TIMEOUT = 120.0
# After its drain timeout, what a worker may still take to close its sinks and stores
# (config.ShutdownConfig says the same to operators).
WORKER_CLOSE_SECONDS = 10.0
_BACKOFF_MAX = 10.0
_NOTIFY = ipc.encode({"type": "notify"})  # written as is to every worker (`notify_webhook`)
NOTIFY_BACKLOG = 64 * 1024
# How old a free-space sample the door may judge a body by (`DiskGuard.refuse_intake`)
DISK_SAMPLE_SECONDS = 0.05


@dataclass
class WorkerSlot:
    """What the control plane knows about worker `index` (across its restarts)."""

    index: int
    proc: WorkerProcess | None = None
    started_at: float = 0.0
    restarts: int = 0
    last_exit: dict[str, Any] | None = None
    writer: asyncio.StreamWriter | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    progress: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] | None = None
    metrics: Dump = field(default_factory=list)
    reported_at: float | None = None
    committed_seen: int = 0  # intake_committed as last seen from this incarnation
    asked: asyncio.Future[None] | None = None  # a fresh report was asked for

    @property
    def name(self) -> str:
        return f"w{self.index}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Pod:
    """Satisfies `ingest.api.app`'s service protocol, like `ingest.service.Service`."""

    def __init__(self, cfg: C.Config, count: int) -> None:
        from ingest.factory import worker_id

        self.config = cfg
        self.count = count
        self.slots = [WorkerSlot(i) for i in range(count)]
        self.metrics = PodMetrics(self._worker_dumps)
        self.admission = Admission(cfg.admission, cfg.limits_for)
        self.admission.on_change = self._on_state_change
        self.intake: Any = None
        self._intake_db: Any = None
        self.stopping = False
        self.started_at = time.time()
        self.worker = worker_id()
        self._retired: Dump = []  # counters of worker incarnations that ended
        self._dir = tempfile.mkdtemp(prefix="ingest-pod-")
        self.socket_path = str(Path(self._dir) / "control.sock")
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sent_control: dict[str, Any] | None = None
        self._intake_backlog = 0
        self._bg: set[asyncio.Future[None]] = set()
        self._starting: set[asyncio.Future[None]] = set()  # worker starts in flight
        self._ready = asyncio.Event()  # every worker said hello once
        self._beat = time.monotonic()  # the tick's last turn: the control plane's liveness
        from ingest.disk import DiskGuard

        sqlite_intake = any(
            isinstance(sc, C.WebhookSourceConfig) and sc.intake == "sqlite" for sc in cfg.sources
        )
        self.disk = DiskGuard(cfg.data_dir, cfg.disk, self.metrics, guards_intake=sqlite_intake)
        self.fleet = PodFleet(cfg, self.admission, self.metrics)

    @property
    def control(self) -> ControlFollower:
        """The fleet's control record, followed for the whole pod (`ingest.pod.fleet`)."""
        return self.fleet.control

    # -- start -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the intake and start the workers; `wait_ready` waits for them."""
        start_fork_server(self.config)  # already running under `ingest run`
        self._tasks += await self.fleet.start(self.metrics.own_registry)  # modes before workers
        await self._open_intake()
        self._server = await asyncio.start_unix_server(
            self._serve, path=self.socket_path, limit=ipc.LIMIT
        )
        for slot in self.slots:
            await self._spawn(slot)
        self._tasks.append(asyncio.create_task(self._tick(), name="pod-tick"))

    async def wait_ready(self) -> None:
        """Until every worker said hello; IngestError if one dies first (a store it cannot
        reach, say), after the pod was shut down."""
        deadline = time.monotonic() + START_TIMEOUT
        for slot in self.slots:
            while not slot.ready.is_set():
                if slot.last_exit is not None:
                    await self.shutdown(timeout=10)
                    raise IngestError(
                        f"worker {slot.name} exited while starting ({_exit_text(slot.last_exit)});"
                        " its error is logged above"
                    )
                if time.monotonic() > deadline:
                    await self.shutdown(timeout=10)
                    raise IngestError(f"worker {slot.name} did not start in {START_TIMEOUT:.0f}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(slot.ready.wait(), 0.1)
        self._ready.set()

    async def _open_intake(self) -> None:
        for sc in self.config.sources:
            if not isinstance(sc, C.WebhookSourceConfig):
                continue
            if sc.intake == "kafka":
                from ingest.webhook.kafka import KafkaIntake

                if not sc.brokers:
                    raise IngestError(f"sources[{sc.name}].brokers is required for intake: kafka")
                self.intake = KafkaIntake(sc.brokers, sc.topic)
                await self.intake.start()
            else:
                from ingest.state.sqlite import SQLiteDB
                from ingest.webhook.sqlite import SQLiteIntake

                state = self.config.state
                path = (
                    self.config.under_data_dir(state.path, "state.db")
                    if isinstance(state, C.SQLiteStateConfig)
                    else self.config.data_dir / "intake.db"
                )
                self._intake_db = await SQLiteDB.open(path)
                # one row per worker a request's entities fall to (ingest.webhook.spread)
                self.intake = SQLiteIntake(self._intake_db, groups=len(self.slots))
            return

    async def _spawn(self, slot: WorkerSlot) -> None:
        """Start slot's worker. The start is a task of its own, shielded: a restart the
        shutdown finds in flight (the fork server forking, or importing after it was started
        again) is finished and its worker drained with the others, never left untracked."""
        start = asyncio.ensure_future(self._start_worker(slot))
        self._starting.add(start)
        start.add_done_callback(self._starting.discard)
        await asyncio.shield(start)

    async def _start_worker(self, slot: WorkerSlot) -> None:
        env = {
            **os.environ,
            ENV_WORKER: f"{slot.index}/{self.count}",
            ENV_SOCKET: self.socket_path,
            ENV_PARENT: str(os.getpid()),
            "INGEST_LOG_LEVEL": logging.getLevelName(logging.getLogger().level),
        }
        proc = await start_worker(env, self.config, self.shutdown_timeout)
        slot.proc = proc
        slot.started_at = time.time()
        slot.ready.clear()
        slot.committed_seen = 0
        self._tasks.append(asyncio.create_task(self._watch(slot, proc), name=f"watch-{slot.name}"))
        if self.stopping:  # forked after the shutdown stopped waiting for starts: stop it too
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    async def _watch(self, slot: WorkerSlot, proc: WorkerProcess) -> None:
        """Wait for the worker to end; unless the pod is stopping, start it again."""
        rc = await proc.wait()
        slot.last_exit = {"code": rc, "at": time.time()}
        if rc < 0:
            slot.last_exit["signal"] = signal.Signals(-rc).name
        # What it counted stays counted: its last report's counters join the retired ones.
        self._retired = add_dumps(self._retired, slot.metrics)
        slot.metrics = []
        slot.writer = None
        slot.ready.clear()
        if self.stopping:
            return
        delay = min(_BACKOFF_MAX, 0.5 * 2 ** min(slot.restarts, 5))
        if time.time() - slot.started_at > 60:
            delay = 0.5  # it ran a good while: not a crash loop
        log.error(
            "worker %s (pid %s) died (%s); starting it again in %.1fs",
            slot.name,
            proc.pid,
            _exit_text(slot.last_exit),
            delay,
        )
        while True:
            await asyncio.sleep(delay)
            if self.stopping:
                return
            slot.restarts += 1
            self.metrics.worker_restarts.labels(slot.name).inc()
            try:
                await self._spawn(slot)
                return
            except Exception as exc:  # the fork server gone and not startable again, say
                delay = _BACKOFF_MAX
                slot.last_exit = {"code": None, "at": time.time(), "start_failed": repr(exc)}
                log.error(
                    "worker %s could not be started (%r); trying again in %.1fs",
                    slot.name,
                    exc,
                    delay,
                )

    # -- the wire --------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One worker's connection. Ends quietly when cancelled: the loop cancels it only as
        it closes (e.g. the HTTP port was taken), and on Python 3.11 a cancelled connection
        task is logged by asyncio as an error with three tracebacks."""
        try:
            await self._serve_worker(reader, writer)
        except asyncio.CancelledError:
            writer.close()

    async def _serve_worker(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        hello = await ipc.recv(reader)
        if hello is None or hello.get("type") != "hello":
            writer.close()
            return
        slot = self.slots[int(hello["index"])]
        slot.writer = writer
        with contextlib.suppress(ConnectionError):
            await ipc.send(writer, {"type": "control", "control": self.admission.control()})
        slot.ready.set()
        while (msg := await ipc.recv(reader)) is not None:
            kind = msg.get("type")
            if kind == "progress":
                committed = int(msg.get("intake_committed", 0))
                self.admission.intake.drained(committed - slot.committed_seen)
                slot.committed_seen = committed
                slot.progress = msg
            elif kind == "report":
                if msg.get("health") is not None:
                    slot.health = msg["health"]
                slot.metrics = msg.get("metrics") or slot.metrics
                slot.reported_at = time.time()
                if slot.asked is not None and not slot.asked.done():
                    slot.asked.set_result(None)
        if slot.writer is writer:
            slot.writer = None

    async def _broadcast(self, msg: dict[str, Any]) -> None:
        for slot in self.slots:
            if slot.writer is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ipc.send(slot.writer, msg)

    def _on_state_change(self, state: BackpressureState) -> None:
        self.metrics.set_backpressure(state.value)
        self._background(self._push_control())

    async def _push_control(self) -> None:
        control = self.admission.control()
        if control != self._sent_control:
            self._sent_control = control
            await self._broadcast({"type": "control", "control": control})

    async def fresh_reports(self, timeout: float = 1.0) -> None:
        """Ask every worker for its report now, so /health/detailed and /metrics are as fresh
        as a single process's (a worker that does not answer in time shows its last one)."""
        loop = asyncio.get_running_loop()
        waits = []
        for slot in self.slots:
            if slot.writer is None:
                continue
            if slot.asked is None or slot.asked.done():
                slot.asked = loop.create_future()
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ipc.send(slot.writer, {"type": "report_now"})
            waits.append(slot.asked)
        if waits:
            await asyncio.wait(waits, timeout=timeout)

    def notify_webhook(self) -> None:
        """Wake the workers' intake readers: the line written at once, no task nor drain a
        request (a task, orjson and a drain each time were ~1 % of the event loop's CPU at
        steady load). A worker whose socket holds NOTIFY_BACKLOG unread bytes is not sent
        more: its reader polls anyway (`WebhookSource.poll_seconds`)."""
        for slot in self.slots:
            writer = slot.writer
            if (
                writer is not None
                and not writer.is_closing()
                and writer.transport.get_write_buffer_size() < NOTIFY_BACKLOG
            ):
                writer.write(_NOTIFY)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _tick(self) -> None:
        """Feed the closed loop and automatic brownout with the pod's figures; push modes."""
        while not self.stopping:
            if self.intake is not None and hasattr(self.intake, "backlog"):
                with contextlib.suppress(Exception):
                    before = self.admission.intake.accepted_so_far()
                    records, _, nbytes = await self.intake.backlog()
                    self._intake_backlog = records
                    self.admission.intake.observe(records, nbytes, before)
            self.admission.set_queue_depth(self.queue_depth())
            await self._push_control()
            self.refresh_gauges()
            self.disk.sample()
            self._beat = time.monotonic()
            await asyncio.sleep(TICK_SECONDS)

    # -- what the HTTP layer reads -----------------------------------------------------------

    def queue_depth(self) -> int:
        return self._intake_backlog + sum(int(s.progress.get("pending", 0)) for s in self.slots)

    def _worker_dumps(self) -> list[Dump]:
        return [self._retired, *(s.metrics for s in self.slots if s.metrics)]

    def _state(self) -> BackpressureState:
        """The pod's state. Operator modes and brownout are the control plane's own (workers
        only mirror them, a report late); `throttled` also when a worker waits for tokens."""
        state = self.admission.state
        if state is BackpressureState.NORMAL and any(
            s.progress.get("state") == BackpressureState.THROTTLED.value for s in self.slots
        ):
            return BackpressureState.THROTTLED
        return state

    def refresh_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth())
        self.metrics.in_flight.set(sum(int(s.progress.get("in_flight", 0)) for s in self.slots))
        self.metrics.set_backpressure(self._state().value)
        alive = sum(1 for s in self.slots if s.alive and s.ready.is_set())
        self.metrics.workers_alive.labels("alive").set(alive)
        self.metrics.workers_alive.labels("down").set(self.count - alive)
        self.fleet.export()

    def _workers_view(self) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {}
        for s in self.slots:
            up = s.alive and s.ready.is_set()
            out[s.name] = {
                "status": "running" if up else ("starting" if s.alive else "down"),
                "pid": s.proc.pid if s.proc is not None else None,
                "id": (s.health or {}).get("worker"),  # as checkpoints and leases name it
                "started_at": s.started_at,
                "restarts": s.restarts,
                "last_exit": s.last_exit,
                "report_age_seconds": None
                if s.reported_at is None
                else round(now - s.reported_at, 1),
                "state": s.progress.get("state"),
                "queue_depth": s.progress.get("pending"),
                "health": (s.health or {}).get("status"),
            }
        return out

    def live(self) -> tuple[bool, dict[str, Any]]:
        """The control plane's loop turns (each worker's own liveness is its restart)."""
        age = time.monotonic() - self._beat
        ok = age < self.config.health.live_timeout_seconds
        return ok, {"status": "ok" if ok else "stuck", "heartbeat_age_seconds": round(age, 3)}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Traffic welcome: every worker running, not draining or paused, none unhealthy."""
        reasons: list[str] = []
        state = self.admission.state
        if state is BackpressureState.DRAIN:
            reasons.append("draining")
        elif state is BackpressureState.PAUSED:
            reasons.append("paused")
        for slot in self.slots:
            if not (slot.alive and slot.ready.is_set()):
                reasons.append(f"worker {slot.name} is not running")
            elif (slot.health or {}).get("ready") is False:
                reasons.append(f"worker {slot.name} is not ready")
        status = "ok" if not reasons else "unhealthy"
        return not reasons, {"ready": not reasons, "status": status, "reasons": reasons}

    def refuse_intake(self, incoming_bytes: int) -> str | None:
        return self.disk.refuse_intake(incoming_bytes, DISK_SAMPLE_SECONDS)

    async def health(self) -> dict[str, Any]:
        backpressure = self.admission.snapshot()  # the state as of the request
        state = self._state()
        if not self._ready.is_set():  # starting: the workers' view is worth a short wait
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), 2.5)
        else:
            await self.fresh_reports()
        docs = {s.name: s.health for s in self.slots if s.health is not None}
        workers = self._workers_view()
        adapters = merge_adapters(docs)
        sinks = merge_sinks(docs)
        for sc in self.config.sources:  # workers still starting: shown, not left out
            adapters.setdefault(sc.name, {"kind": sc.type, **_STARTING_ADAPTER, "workers": {}})
        for sk in self.config.sinks:
            sinks.setdefault(sk.name, {"kind": sk.type, "state": "closed", "workers": {}})
        backpressure["state"] = state.value
        backpressure["queue_depth"] = self.queue_depth()
        backpressure["in_flight"] = sum(int(s.progress.get("in_flight", 0)) for s in self.slots)
        backpressure["max_in_flight"] = self.config.admission.max_in_flight * self.count
        problems = merge_problems(docs)
        for wname, w in workers.items():
            if w["status"] != "running":
                problems.append(
                    {
                        "component": f"worker:{wname}",
                        "severity": "degraded",
                        "message": f"worker {w['status']}",
                    }
                )
        if state is not BackpressureState.NORMAL:
            problems.append(
                {
                    "component": "backpressure",
                    "severity": "degraded",
                    "message": f"state {state.value}",
                }
            )
        disk = merge_disk(docs, self.disk.snapshot())
        if disk.get("intake_refused"):
            problems.append(
                {
                    "component": "disk",
                    "severity": "degraded",
                    "message": "free space below the low watermark: webhook intake refused",
                }
            )
        # the worst of the workers' own verdicts (each from its stores, sinks, sources, disk)
        status = worst_status(docs, "degraded" if problems else "ok")
        any_doc = next(iter(docs.values()), {})
        ready, _ = self.ready()
        doc = {
            "status": status,
            "mode": any_doc.get("mode", "embedded"),
            "worker": self.worker,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "ready": ready,
            "problems": problems,
            "disk": disk,
            "adapters": adapters,
            "backpressure": backpressure,
            "sinks": sinks,
            "stores": first_stores(docs),
            "store_errors": [e for d in docs.values() for e in d.get("store_errors", [])],
            "workers": workers,
        }
        self.fleet.add_to_health(doc)
        return doc

    # -- stop ------------------------------------------------------------------------------

    @property
    def shutdown_timeout(self) -> float:
        """What the workers get to drain and close: also on an exit without `shutdown`
        (`ingest.pod.spawn.stop_workers_at_exit`)."""
        return self.config.shutdown.drain_timeout_seconds + WORKER_CLOSE_SECONDS

    async def shutdown(self, timeout: float | None = None) -> None:
        """Drain: refuse new webhooks, let every worker finish, commit and exit, then close.
        `timeout` defaults to each worker's drain timeout plus WORKER_CLOSE_SECONDS, the time
        a worker takes to close its sinks and stores once drained."""
        if timeout is None:
            timeout = self.shutdown_timeout
        log.info("shutting down: draining %d workers", self.count)
        self.fleet.freeze()  # the pod's drain is its own: no fleet resume may undo it
        self.admission.drain()
        self.stopping = True
        deadline = time.monotonic() + timeout
        if self._starting:  # a restart in flight: its worker is tracked and drained too
            log.info("waiting for %d worker start(s) in flight", len(self._starting))
            await asyncio.wait(set(self._starting), timeout=timeout)
        timeout = max(1.0, deadline - time.monotonic())
        for slot in self.slots:
            if slot.alive and slot.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGTERM)
        procs = [s.proc for s in self.slots if s.proc is not None]
        done = asyncio.gather(*(p.wait() for p in procs))
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            log.error("workers did not finish in %.0fs; killing them", timeout)
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            await done
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        if self.intake is not None:
            with contextlib.suppress(Exception):
                await self.intake.close()
        if self._intake_db is not None:
            await self._intake_db.close()
        with contextlib.suppress(Exception):
            await self.fleet.close()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
            os.rmdir(self._dir)
        log.info("shutdown complete")

    @property
    def exit_codes(self) -> list[int | None]:
        return [s.proc.returncode if s.proc is not None else None for s in self.slots]


_STARTING_ADAPTER: dict[str, Any] = {
    "status": "starting",
    "lag_seconds": 0.0,
    "last_checkpoint": None,
    "last_checkpoint_at": None,
    "errors": [],
    "records_read": 0,
}


def _exit_text(last_exit: dict[str, Any]) -> str:
    if "signal" in last_exit:
        return f"killed by {last_exit['signal']}"
    if "start_failed" in last_exit:
        return f"could not be started: {last_exit['start_failed']}"
    return f"exit code {last_exit['code']}"
