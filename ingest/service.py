"""Runs the service: start, supervise each source's runner, tick, health, drain, serve HTTP.

What runs is built by `ingest.factory` (stores, sinks, sources, the delivery Core); this
module only runs it. The HTTP layer sees it through `ingest.api.app.ServiceHost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from ingest import config as C
from ingest.disk import DiskGuard
from ingest.errors import ConfigError, IngestError, is_disk_full
from ingest.factory import SOURCES, Core, SourceSet, build_core, build_sources, worker_id
from ingest.health import HealthMonitor
from ingest.pipeline.control import add_to_health
from ingest.pipeline.progress import SourceProgress
from ingest.pipeline.runner import SourceRunner
from ingest.replay.metrics import ReplayCollector, replay_metrics
from ingest.replay.plans import plan_store
from ingest.sources.base import Source

log = logging.getLogger(__name__)


# Generation-0 thresholds. A process that takes webhooks (the pod's control plane, a single
# process) makes cyclic garbage (~45,000 objects a collection in bench_steady): a higher
# threshold collects the same garbage in longer pauses (~0.3 s at 200,000). A pod's pipeline
# worker makes none: its young collections walk every batch list in flight (~80,000
# references in the embedded pod, 4-15 ms) and free nothing, so their cost a record falls
# with their count (docs/benchmarks.md, embr's 1M section).
GC_YOUNG_THRESHOLD = 50_000
GC_YOUNG_THRESHOLD_WORKER = 200_000


def tune_gc(young: int = GC_YOUNG_THRESHOLD) -> None:
    """Fewer, cheaper collections: records in flight are acyclic, and CPython's default
    generation-0 threshold (700) makes the collector walk every in-flight batch again and
    again (measured: 2-4x throughput on the S3 path). Start-up objects are frozen so full
    collections skip them."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, 20, 20)


# How long a thread holding the GIL keeps it once another asks (CPython's default: 5 ms). A
# pipeline process's threads take turns at it: the event loop, the decode thread (the compiled
# decoder gives the GIL back and asks again every 256 lines, ~20 times a 5,000-record batch)
# and a Kafka poll thread. At 5 ms each turn could wait that long behind the loop: a batch's decode
# took 74-77 ms of wall for ~25 ms of CPU (S3, one process, traced), and the loop's COPYs
# waited likewise. At 1 ms: decode 46-54 ms, the run's CPU lower, not higher (fewer, shorter
# convoys); docs/benchmarks.md, s3k's section.
SWITCH_INTERVAL_S = 0.001


def tune_threads() -> None:
    """The GIL handed over within SWITCH_INTERVAL_S of another thread asking for it: in every
    process that runs the pipeline (a pod's workers, a one-worker service), not in a pod's
    control plane, whose threads do not take turns on the record path."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


# ---------------------------------------------------------------------- the service
class Service:
    """One running worker: its sources' runners under supervision, the admission tick, health,
    and the drain on shutdown. Satisfies `ingest.api.app.ServiceHost`."""

    def __init__(self, core: Core, sources: SourceSet) -> None:
        self.core = core
        self.config = core.config
        self.stores = core.stores
        self.sources = sources.sources
        self.intake = sources.intake
        self._webhook = sources.webhook
        self._prepaid = sources.prepaid  # webhook readers: tokens were taken at the door
        self.lanes = core.lanes
        self.metrics = core.metrics
        self.admission = core.admission
        self.decoder = core.decoder
        self.pipeline = core.pipeline
        self.stopping = asyncio.Event()
        self.started_at = time.time()
        self._pending = 0
        self._intake_backlog = 0
        self._intake_committed = 0
        self.in_pod = False  # a worker of a pod: its control plane watches the intake
        self.shard: tuple[int, int] | None = None  # (i, n) as a pod's worker i of n
        self._tasks: list[asyncio.Task[None]] = []
        self.worker = worker_id()
        self.control = core.control  # run only outside a pod: a pod's control plane follows
        self.replays = ReplayCollector()  # replay progress from the plan store, on /metrics
        self.pipeline.stopping = self.stopping  # outage waits give up on shutdown
        self.progress = {s.name: SourceProgress() for s in self.sources}
        self.disk = DiskGuard(
            self.config.data_dir,
            self.config.disk,
            self.metrics,
            guards_intake=self._webhook is not None,  # intake on this disk (not Kafka)
        )
        self.monitor = HealthMonitor(
            cfg=self.config.health,
            metrics=self.metrics,
            admission=self.admission,
            pipeline=self.pipeline,
            lanes=self.lanes,
            probe_stores=self.stores.health,
            sources=lambda: self.sources,
            progress=self.progress,
            queue_depth=self.queue_depth,
            disk=self.disk,
            info={
                "mode": "embedded" if self.stores.sqlite_db is not None else "production",
                "worker": self.worker,
            },
        )

    @classmethod
    async def build(cls, cfg: C.Config, shard: tuple[int, int] | None = None) -> Service:
        """`shard` (i, n): worker i of a pod (ingest.pod.worker)."""
        core = await build_core(cfg)
        service = cls(core, await build_sources(cfg, core.stores, shard))
        service.in_pod = shard is not None
        service.shard = shard
        return service

    def notify_webhook(self) -> None:
        if self._webhook is not None:
            self._webhook.notify()

    def _on_pending(self, delta: int) -> None:
        self._pending += delta

    async def start(self) -> None:
        if not self.in_pod:  # a pod's workers take the modes from their control plane
            await self.control.sync()  # a pod joining a drained or paused fleet starts so
            if self.control.applied.state != "normal":
                log.warning(
                    "fleet control: starting %s (set by %s)",
                    self.control.applied.state,
                    self.control.applied.updated_by,
                )
            self.metrics.registry.register(self.replays)
            self._tasks.append(
                asyncio.create_task(self.control.run(self.stopping), name="fleet-control")
            )
            self._tasks.append(
                asyncio.create_task(
                    replay_metrics(self.replays, plan_store(self.stores), self.stopping),
                    name="replay-metrics",
                )
            )
        self.disk.sample()
        self._tasks.append(asyncio.create_task(self.monitor.run(self.stopping), name="health"))
        # The sinks start beside the sources: a source's first listing, leases, reads and
        # decode (~0.1-0.15 s to a pod worker's first batch) no longer wait for the sinks'
        # connections (~0.07-0.09 s); its first write waits for its sink's start, which it
        # shares (`SinkLane.ensure_started`). Started is still "sinks tried" as before.
        sinks = asyncio.create_task(self.core.start_sinks(), name="start-sinks")
        try:
            for source in self.sources:
                await source.start()
            for index, source in enumerate(self.sources):
                self.metrics.declare_source(source.name)
                self._tasks.append(
                    asyncio.create_task(self._supervise(index), name=f"source:{source.name}")
                )
        finally:
            await sinks
        self._tasks.append(asyncio.create_task(self._tick(), name="tick"))
        self.monitor.started = True

    def _runner(self, source: Source) -> SourceRunner:
        return SourceRunner(
            source,
            self.pipeline,
            self.decoder,
            self.admission,
            stopping=self.stopping,
            on_pending=self._on_pending,
            progress=self.progress[source.name],
            take_tokens=source.name not in self._prepaid,
        )

    async def _supervise(self, index: int) -> None:
        """Run a source; after an unexpected error, rebuild it and run it again, with backoff.
        Never exits before stopping. Each restart is visible: the log, the adapter's errors
        and status (`restarting`), `ingest_source_restarts_total` and `ingest_source_errors_total`.

        The source is rebuilt from its config rather than resumed: what the failed run had
        read and not committed must be read again, and only a fresh source (starting from its
        checkpoint, offsets or leases) does that for every kind of source."""
        delay = 1.0
        while not self.stopping.is_set():
            source = self.sources[index]
            progress = self.progress[source.name]
            try:
                progress.running()
                await self._runner(source).run()
                return
            except Exception as exc:
                if is_disk_full(exc):  # already logged by the runner, in one line
                    log.error(
                        "source %s stopped: no disk space; restarting in %.0fs", source.name, delay
                    )
                else:
                    log.exception("source %s stopped; restarting in %.0fs", source.name, delay)
                source.health().error(f"runner restarting after {type(exc).__name__}: {exc}")
                self.metrics.source_restarts.labels(source.name).inc()
                progress.restarted(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                delay = min(delay * 2, 30.0)
                if not self.stopping.is_set():
                    await self._rebuild(index)

    async def _rebuild(self, index: int) -> None:
        """Close source `index` and put a fresh one from its config in its place; if that
        fails, keep the old one (the next run fails again, visibly, and is retried). The
        HTTP handler keeps its intake: a second one the builder made is closed."""
        old = self.sources[index]
        sc = next(s for s in self.config.sources if s.name == old.name)
        with contextlib.suppress(Exception):
            await old.close()
        try:
            built = await SOURCES[sc.type].build(self.config, sc, self.stores, self.shard)
            await built.source.start()
        except Exception as exc:
            log.exception("source %s could not be rebuilt", old.name)
            old.health().error(f"could not rebuild the source: {type(exc).__name__}: {exc}")
            return
        if built.intake is not None and built.intake is not self.intake:
            with contextlib.suppress(Exception):
                await built.intake.close()
        if built.webhook is not None:
            self._webhook = built.webhook
            self._intake_committed = 0
        built.source.health().errors[:0] = old.health().errors  # keep the history visible
        self.sources[index] = built.source

    async def _tick(self) -> None:
        """Feed queue depth to admission (automatic brownout) and refresh gauges."""
        while not self.stopping.is_set():
            if self._webhook is not None and not self.in_pod:
                with contextlib.suppress(Exception):
                    await self._observe_intake(self._webhook)
            self.admission.set_queue_depth(self.queue_depth())
            self.refresh_gauges()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.5)

    async def _observe_intake(self, webhook: Any) -> None:
        """Feed the closed loop: records committed out of the intake, then its size."""
        before = self.admission.intake.accepted_so_far()
        records, _, nbytes = await webhook.refresh_backlog()
        committed = webhook.committed_records
        self.admission.intake.drained(committed - self._intake_committed)
        self._intake_committed = committed
        self.admission.intake.observe(records, nbytes, before)
        self._intake_backlog = records

    @property
    def pending(self) -> int:
        """Records read from sources and not yet committed."""
        return max(0, self._pending)

    def intake_committed(self) -> int:
        """Records this process committed out of the webhook intake, ever."""
        return self._webhook.committed_records if self._webhook is not None else 0

    def queue_depth(self) -> int:
        return max(0, self._pending) + self._intake_backlog

    def refresh_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth())
        self.metrics.in_flight.set(self.admission.in_flight_count)
        self.metrics.set_backpressure(self.admission.state.value)
        for name, lane in self.lanes.items():
            self.metrics.set_breaker(name, lane.breaker.state.value)
        self.monitor.observe()  # adapter lag, errors, stalls
        if not self.in_pod:
            self.control.export(self.metrics)

    async def health(self) -> dict[str, Any]:
        """/health/detailed: see ingest.health (plus fleet control and rate limits)."""
        doc = await self.monitor.detailed()
        if not self.in_pod:
            add_to_health(doc, self.control, self.admission.limiter)
        return doc

    def live(self) -> tuple[bool, dict[str, Any]]:
        return self.monitor.live()

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return self.monitor.ready()

    def refuse_intake(self, incoming_bytes: int) -> str | None:
        return self.disk.refuse_intake(incoming_bytes)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Drain: stop taking new work, finish and commit what is in flight, close.
        `timeout` defaults to shutdown.drain_timeout_seconds."""
        if timeout is None:
            timeout = self.config.shutdown.drain_timeout_seconds
        log.info("shutting down: draining in-flight work")
        self.control.freeze()  # this pod's drain is its own: no fleet resume may undo it
        self.admission.drain()
        self.stopping.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                log.error("task %s did not finish in %.0fs; cancelling", task.get_name(), timeout)
                task.cancel()
        for source in self.sources:
            with contextlib.suppress(Exception):
                await source.close()
        if self.intake is not None:
            with contextlib.suppress(Exception):
                await self.intake.close()
        await self.core.close()  # sinks, then stores
        log.info("shutdown complete")


async def serve(
    cfg: C.Config,
    *,
    host: str | None = None,
    port: int | None = None,
    ready: Callable[[Any], None] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT: then drain, flush, checkpoint and return (exit 0).

    With `workers` > 1 this process is the pod's control plane (`ingest.pod.control`) and
    the pipeline runs in that many worker processes. Every request meets the guard
    (`ingest.api.auth.Gate`, docs/security.md); `http.admin_port` puts /admin/* on a listener
    of its own."""
    import uvicorn

    tune_gc()

    from ingest.api import admin
    from ingest.api.app import build_app
    from ingest.api.auth import Gate
    from ingest.auth import setup as auth_setup
    from ingest.pod.control import Pod
    from ingest.state.audit import audit_store

    auth = auth_setup.load(cfg)  # before anything opens: production without credentials stops
    main_host = host or cfg.http.host
    main_port = port if port is not None else cfg.http.port
    listeners: list[tuple[Literal["all", "main", "admin"], str, int, str]] = [
        ("all", main_host, main_port, "http.port")
    ]
    if cfg.http.admin_port is not None:
        listeners = [
            ("main", main_host, main_port, "http.port"),
            ("admin", cfg.http.admin_host or main_host, cfg.http.admin_port, "http.admin_port"),
        ]
    # Bound (not listening: connections are refused until uvicorn serves) before anything
    # starts, so a port in use is one line and exit 2 at once, not uvicorn's exit 3.
    sockets: list[list[socket.socket]] = []
    try:
        for _, h, p, key in listeners:
            sockets.append(bind_listener(h, p, key))
    except ConfigError:
        for socks in sockets:
            for sock in socks:
                sock.close()
        raise
    count = cfg.worker_count()
    if count <= 1:
        tune_threads()  # this process runs the pipeline itself
    service: Service | Pod = Pod(cfg, count) if count > 1 else await Service.build(cfg)
    await service.start()
    if isinstance(service, Pod):
        await service.wait_ready()  # serve once every worker runs, as one process would
    control = await _ControlState.of(cfg, service)
    gate = Gate(
        auth_setup.guard(cfg, auth, control.stores), audit_store(control.stores), service.metrics
    )
    extra = admin.routes(control.stores, control.core, gate)
    servers = [
        uvicorn.Server(
            uvicorn.Config(
                build_app(service, gate, auth_health=auth.health, extra_admin=extra, part=part),
                host=h,
                port=p,
                log_level="warning",
                access_log=False,
                lifespan="off",
                ws="none",  # no WebSocket routes: spares importing `websockets` at start-up
                # The peer the audit trail and the logs name is the TCP peer: uvicorn would
                # otherwise take X-Forwarded-For from any local process (its default trusts
                # 127.0.0.1) and let it write another address into the audit rows.
                proxy_headers=False,
                # Longer than any Retry-After we answer, so a client that waited as told finds
                # its connection still open (a close racing its next POST looks like a failure).
                timeout_keep_alive=75,
            )
        )
        for part, h, p, _ in listeners
    ]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Server._serve skips uvicorn's own signal capture: SIGTERM must drain the pipeline first.
    tasks = [
        asyncio.create_task(server._serve(socks))
        for server, socks in zip(servers, sockets, strict=True)
    ]
    while not all(s.started or t.done() for s, t in zip(servers, tasks, strict=True)):
        await asyncio.sleep(0.02)
    failed_servers = [s for s, t in zip(servers, tasks, strict=True) if t.done()]
    if failed_servers:
        for server in servers:
            server.should_exit = True
        await service.shutdown(timeout=5)
        await control.close()
        for task in tasks:
            with contextlib.suppress(SystemExit, Exception):
                await task
        bad = failed_servers[0].config
        raise ConfigError(
            "http.admin_port" if bad.port == cfg.http.admin_port else "http.port",
            f"cannot serve HTTP on {bad.host}:{bad.port} (is the port in use? set "
            "http.port / INGEST_HTTP_PORT / --port, http.admin_port / INGEST_ADMIN_PORT)",
        )
    if ready is not None:
        ready(service)
    await stop.wait()
    log.info("signal received")
    await service.shutdown()
    await control.close()
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks)
    failed = [c for c in getattr(service, "exit_codes", []) if c != 0]
    if failed:
        raise IngestError(f"workers did not drain cleanly (exit codes {failed}); see the log")


def bind_listener(host: str, port: int, key: str) -> list[socket.socket]:
    """Sockets bound to every address of host:port, as asyncio's create_server would bind
    them, but not listening yet. A port that cannot be had (in use, privileged, an address
    not on this host) is a ConfigError naming the port and the setting (exit 2)."""
    socks: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
    except OSError as exc:
        for sock in socks:
            sock.close()
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            why = "the port is already in use by another process"
        elif exc.errno == errno.EACCES:
            why = "permission denied (ports below 1024 need privileges)"
        env = "INGEST_ADMIN_PORT" if key == "http.admin_port" else "INGEST_HTTP_PORT / --port"
        raise ConfigError(
            key, f"cannot listen on {host or '*'}:{port}: {why}; free it or set {key} ({env})"
        ) from None
    return socks


class _ControlState:
    """The state stores the HTTP layer reads and writes itself (seen signatures, the audit
    trail, DLQ reads, plans) and the Core a redrive delivers through: the service's own, or,
    in a pod's control plane, a handle of its own on the same shared stores (the Core is built
    on the first redrive)."""

    def __init__(self, cfg: C.Config, stores: Any, core: Core | None, owned: bool) -> None:
        self._cfg = cfg
        self.stores = stores
        self._core = core
        self._owned = owned

    @classmethod
    async def of(cls, cfg: C.Config, service: Any) -> _ControlState:
        if isinstance(service, Service):
            return cls(cfg, service.stores, service.core, owned=False)
        from ingest.factory import open_stores

        return cls(cfg, await open_stores(cfg), None, owned=True)

    async def core(self) -> Core:
        if self._core is None:
            self._core = await build_core(self._cfg)
            await self._core.start_sinks()
        return self._core

    async def close(self) -> None:
        if not self._owned:
            return
        with contextlib.suppress(Exception):
            if self._core is not None:
                await self._core.close()
            await self.stores.close()
