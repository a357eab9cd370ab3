"""Builds the service from its config and runs it: stores, sinks, sources, pipeline, HTTP.

Which class serves each config `type` is spelled out in the two registries below (no
registration by import side effect); drivers are imported only when their type is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ingest import config as C
from ingest.errors import ConfigError
from ingest.metrics import Metrics
from ingest.pipeline.admission import Admission, BackpressureState
from ingest.pipeline.breaker import BreakerState, CircuitBreaker
from ingest.pipeline.decode import Decoder
from ingest.pipeline.retry import RetryPolicy
from ingest.pipeline.runner import SourceRunner
from ingest.pipeline.worker import Pipeline, SinkLane
from ingest.sinks.base import Sink
from ingest.sources.base import Source
from ingest.state.base import CheckpointStore, DLQStore, DroppedStore, IdempotencyStore

log = logging.getLogger(__name__)


class Intake:
    """What the webhook handler needs: make a body durable (SQLite table or Kafka topic)."""

    async def append(self, tenant: str, source: str, lines: list[bytes], received_at: float) -> int:
        raise NotImplementedError


@dataclass
class Stores:
    checkpoints: CheckpointStore
    idempotency: IdempotencyStore
    dlq: DLQStore
    dropped: DroppedStore
    health: Callable[[], Awaitable[dict[str, Any]]]
    close: Callable[[], Awaitable[None]]
    sqlite_db: Any = None  # ingest.state.sqlite.SQLiteDB in embedded mode (intake, leases)
    pg_pool: Any = None  # asyncpg pool in production mode (leases)


def tune_gc() -> None:
    """Fewer, cheaper collections: records in flight are acyclic, and CPython's default
    generation-0 threshold (700) makes the collector walk every in-flight batch again and
    again (measured: 2-4x throughput on the S3 path). Start-up objects are frozen so full
    collections skip them."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# ---------------------------------------------------------------------- stores
async def open_stores(cfg: C.Config) -> Stores:
    state = cfg.state
    if isinstance(state, C.SQLiteStateConfig):
        from ingest.state.sqlite import (
            SQLiteCheckpointStore,
            SQLiteDB,
            SQLiteDLQStore,
            SQLiteDroppedStore,
            SQLiteIdempotencyStore,
        )

        db = await SQLiteDB.open(cfg.under_data_dir(state.path, "state.db"))
        dlq = SQLiteDLQStore(db)

        async def sqlite_health() -> dict[str, Any]:
            return {"state": await dlq.health()}

        return Stores(
            checkpoints=SQLiteCheckpointStore(db, worker_id()),
            idempotency=SQLiteIdempotencyStore(db, state.idempotency_ttl_seconds),
            dlq=dlq,
            dropped=SQLiteDroppedStore(db),
            health=sqlite_health,
            close=db.close,
            sqlite_db=db,
        )
    from ingest.state.postgres import (
        PostgresDLQStore,
        PostgresDroppedStore,
        connect_pool,
        migrate,
    )
    from ingest.state.redis import RedisCheckpointStore, RedisIdempotencyStore, redis_client

    client = redis_client(state.redis_url)
    pool = await connect_pool(state.postgres_url)
    await migrate(pool)
    idem = RedisIdempotencyStore(client, state.idempotency_ttl_seconds)
    pg_dlq = PostgresDLQStore(pool)

    async def prod_health() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, probe in (("redis", idem.health), ("postgres", pg_dlq.health)):
            try:
                out[name] = await probe()
            except Exception as exc:
                out[name] = {"ok": False, "error": str(exc)}
        return out

    async def prod_close() -> None:
        await client.aclose()
        await pool.close()

    return Stores(
        checkpoints=RedisCheckpointStore(client, state.worker_id or worker_id()),
        idempotency=idem,
        dlq=pg_dlq,
        dropped=PostgresDroppedStore(pool),
        health=prod_health,
        close=prod_close,
        pg_pool=pool,
    )


# ---------------------------------------------------------------------- sinks
def _sqlite_sink(cfg: C.Config, sc: Any) -> Sink:
    from ingest.sinks.sqlite import SQLiteSink

    return SQLiteSink(sc.name, cfg.under_data_dir(sc.path, "sink.db"))


def _postgres_sink(cfg: C.Config, sc: Any) -> Sink:
    from ingest.sinks.postgres import PostgresSink

    dsn = sc.dsn or (
        cfg.state.postgres_url if isinstance(cfg.state, C.ProductionStateConfig) else None
    )
    if dsn is None:
        raise ConfigError(f"sinks[{sc.name}].dsn", "required when state is not production")
    return PostgresSink(sc.name, dsn, sc.table, sc.statement_timeout_ms)


def _neo4j_sink(cfg: C.Config, sc: Any) -> Sink:
    from ingest.sinks.neo4j import Neo4jSink

    sink: Sink = Neo4jSink(sc.name, sc.uri, sc.user, sc.password, sc.database)
    return sink


def _typesense_sink(cfg: C.Config, sc: Any) -> Sink:
    from ingest.sinks.typesense import TypesenseSink

    sink: Sink = TypesenseSink(sc.name, sc.url, sc.api_key, sc.fields, sc.timeout_seconds)
    return sink


SINKS: dict[str, Callable[[C.Config, Any], Sink]] = {
    "sqlite": _sqlite_sink,
    "postgres": _postgres_sink,
    "neo4j": _neo4j_sink,
    "typesense": _typesense_sink,
}


# ---------------------------------------------------------------------- sources
@dataclass
class SourceSet:
    sources: list[Source] = field(default_factory=list)
    intake: Any = None  # SQLiteIntake | KafkaIntake for the webhook handler
    webhook: Any = None  # the embedded WebhookSource, to wake on new rows


async def build_sources(cfg: C.Config, stores: Stores) -> SourceSet:
    out = SourceSet()
    for sc in cfg.sources:
        if isinstance(sc, C.InboxSourceConfig):
            from ingest.sources.inbox import InboxSource

            inbox_cfg = sc.model_copy(update={"path": cfg.under_data_dir(sc.path, "inbox")})
            out.sources.append(InboxSource(inbox_cfg, stores.checkpoints))
        elif isinstance(sc, C.WebhookSourceConfig):
            if sc.intake == "kafka":
                from ingest.sources.kafka import KafkaSource
                from ingest.sources.kafka_intake import KafkaIntake

                if not sc.brokers:
                    raise ConfigError(f"sources[{sc.name}].brokers", "required for intake: kafka")
                out.intake = KafkaIntake(sc.brokers, sc.topic)
                await out.intake.start()
                kcfg = C.KafkaSourceConfig(
                    name=sc.name,
                    brokers=sc.brokers,
                    topics=[sc.topic],
                    group_id=sc.group_id,
                    batch_size=sc.batch_size,
                )
                out.sources.append(KafkaSource(kcfg, max_record_bytes=cfg.http.max_record_bytes))
            else:
                from ingest.sources.webhook import WebhookSource
                from ingest.state.intake import SQLiteIntake
                from ingest.state.sqlite import SQLiteDB

                db = stores.sqlite_db or await SQLiteDB.open(cfg.data_dir / "intake.db")
                out.intake = SQLiteIntake(db)
                out.webhook = WebhookSource(sc, out.intake, stores.checkpoints)
                out.sources.append(out.webhook)
        elif isinstance(sc, C.KafkaSourceConfig):
            from ingest.sources.kafka import KafkaSource

            out.sources.append(KafkaSource(sc, max_record_bytes=cfg.http.max_record_bytes))
        elif isinstance(sc, C.S3SourceConfig | C.SFTPSourceConfig):
            leases = await _lease_store(cfg, stores)
            # A stable state.worker_id lets a restarted worker take back its own leases at
            # once instead of waiting for them to expire.
            state = cfg.state
            wid = (
                state.worker_id
                if isinstance(state, C.ProductionStateConfig) and state.worker_id
                else worker_id()
            )
            if isinstance(sc, C.S3SourceConfig):
                from ingest.sources.s3 import S3Source

                out.sources.append(S3Source(sc, stores.checkpoints, leases, worker_id=wid))
            else:
                from ingest.sources.sftp import SFTPSource

                out.sources.append(SFTPSource(sc, stores.checkpoints, leases, worker_id=wid))
    return out


async def _lease_store(cfg: C.Config, stores: Stores) -> Any:
    if stores.pg_pool is not None:
        from ingest.state.leases import PostgresLeaseStore

        pg_leases = PostgresLeaseStore(stores.pg_pool)
        await pg_leases.ensure_schema()
        return pg_leases
    from ingest.state.leases import SQLiteLeaseStore

    return SQLiteLeaseStore(stores.sqlite_db)


# ---------------------------------------------------------------------- the core
@dataclass
class Core:
    """Everything but sources: what the service and `dlqtriage redrive` both deliver with."""

    config: C.Config
    stores: Stores
    lanes: dict[str, SinkLane]
    metrics: Metrics
    admission: Admission
    decoder: Decoder
    pipeline: Pipeline

    async def start_sinks(self) -> None:
        """Start every sink; one that is down is started again on its first write."""
        for name, lane in self.lanes.items():
            try:
                await asyncio.wait_for(lane.ensure_started(), 15.0)
            except Exception as exc:
                log.error("sink %s could not start (%s); will retry on first write", name, exc)

    async def close(self) -> None:
        for lane in self.lanes.values():
            with contextlib.suppress(Exception):
                await lane.sink.close()
        await self.stores.close()


async def build_core(cfg: C.Config, *, metrics: Metrics | None = None) -> Core:
    from ingest.transformers.extra import load_extra

    extra = load_extra(cfg.transformers)  # before opening anything: a bad spec leaks nothing
    metrics = metrics or Metrics()
    admission = Admission(cfg.admission, cfg.limits_for)
    admission.on_change = lambda st: metrics.set_backpressure(st.value)
    stores = await open_stores(cfg)
    lanes: dict[str, SinkLane] = {}
    for sc in cfg.sinks:
        sink = SINKS[sc.type](cfg, sc)
        breaker = CircuitBreaker.from_config(
            sc.name, cfg.breaker, on_change=lambda name, st: metrics.set_breaker(name, st.value)
        )
        lanes[sc.name] = SinkLane(sink, breaker)
        metrics.declare_sink(sc.name)
    decoder = Decoder(max_record_bytes=cfg.http.max_record_bytes, extra=extra)
    pipeline = Pipeline(
        config=cfg,
        admission=admission,
        idempotency=stores.idempotency,
        dlq=stores.dlq,
        dropped=stores.dropped,
        lanes=lanes,
        metrics=metrics,
        retry=RetryPolicy.from_config(cfg.retry),
    )
    return Core(cfg, stores, lanes, metrics, admission, decoder, pipeline)


# ---------------------------------------------------------------------- the service
class Service:
    def __init__(self, core: Core, sources: SourceSet) -> None:
        self.core = core
        self.config = core.config
        self.stores = core.stores
        self.sources = sources.sources
        self.intake = sources.intake
        self._webhook = sources.webhook
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
        self._tasks: list[asyncio.Task[None]] = []
        self.worker = worker_id()

    @classmethod
    async def build(cls, cfg: C.Config) -> Service:
        core = await build_core(cfg)
        return cls(core, await build_sources(cfg, core.stores))

    def notify_webhook(self) -> None:
        if self._webhook is not None:
            self._webhook.notify()

    def _on_pending(self, delta: int) -> None:
        self._pending += delta

    async def start(self) -> None:
        await self.core.start_sinks()
        for source in self.sources:
            await source.start()
        for source in self.sources:
            runner = SourceRunner(
                source,
                self.pipeline,
                self.decoder,
                self.admission,
                stopping=self.stopping,
                on_pending=self._on_pending,
            )
            self._tasks.append(asyncio.create_task(self._supervise(runner), name=source.name))
        self._tasks.append(asyncio.create_task(self._tick(), name="tick"))

    async def _supervise(self, runner: SourceRunner) -> None:
        """Restart a source's runner after an unexpected error, with backoff; never exit."""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                await runner.run()
                return
            except Exception as exc:
                log.exception("source %s stopped; restarting in %.0fs", runner.source.name, delay)
                runner.source.health().error(f"runner restarted after error: {exc}")
                self.metrics.source_errors.labels(runner.source.name).inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                delay = min(delay * 2, 30.0)
                runner = SourceRunner(
                    runner.source,
                    self.pipeline,
                    self.decoder,
                    self.admission,
                    stopping=self.stopping,
                    on_pending=self._on_pending,
                )

    async def _tick(self) -> None:
        """Feed queue depth to admission (automatic brownout) and refresh gauges."""
        while not self.stopping.is_set():
            if self._webhook is not None:
                with contextlib.suppress(Exception):
                    await self._observe_intake(self._webhook)
            self.admission.set_queue_depth(self.queue_depth())
            self.refresh_gauges()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.5)

    async def _observe_intake(self, webhook: Any) -> None:
        """Feed the closed loop: records committed out of the intake, then its size."""
        records, _, nbytes = await webhook.refresh_backlog()
        committed = webhook.committed_records
        self.admission.intake.drained(committed - self._intake_committed)
        self._intake_committed = committed
        self.admission.intake.observe(records, nbytes)
        self._intake_backlog = records

    def queue_depth(self) -> int:
        return max(0, self._pending) + self._intake_backlog

    def refresh_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth())
        self.metrics.in_flight.set(self.admission.in_flight_count)
        self.metrics.set_backpressure(self.admission.state.value)
        for name, lane in self.lanes.items():
            self.metrics.set_breaker(name, lane.breaker.state.value)
        for source in self.sources:
            self.metrics.adapter_lag.labels(source.name).set(source.health().lag_seconds)

    async def health(self) -> dict[str, Any]:
        adapters = {s.name: {"kind": s.kind, **s.health().as_dict()} for s in self.sources}
        sinks: dict[str, Any] = {}
        for name, lane in self.lanes.items():
            try:
                conn = await asyncio.wait_for(lane.sink.health(), 2.0)
            except Exception as exc:
                conn = {"connected": False, "error": str(exc) or type(exc).__name__}
            snap = lane.breaker.snapshot()
            sinks[name] = {
                "kind": lane.sink.kind,
                "state": snap["state"],
                "breaker": snap,
                "connection": conn,
            }
        try:
            stores = await asyncio.wait_for(self.stores.health(), 2.0)
        except Exception as exc:
            stores = {"ok": False, "error": str(exc) or type(exc).__name__}
        backpressure = self.admission.snapshot()
        backpressure["queue_depth"] = self.queue_depth()
        degraded = (
            any(s["state"] != BreakerState.CLOSED.value for s in sinks.values())
            or any(a["status"] == "error" for a in adapters.values())
            or self.admission.state is not BackpressureState.NORMAL
        )
        return {
            "status": "degraded" if degraded else "ok",
            "mode": "embedded" if self.stores.sqlite_db is not None else "production",
            "worker": self.worker,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "adapters": adapters,
            "backpressure": backpressure,
            "sinks": sinks,
            "stores": stores,
            "store_errors": list(self.pipeline.store_errors),
        }

    async def shutdown(self, timeout: float = 60.0) -> None:
        """Drain: stop taking new work, finish and commit what is in flight, close."""
        log.info("shutting down: draining in-flight work")
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
        if self.intake is not None and hasattr(self.intake, "close"):
            with contextlib.suppress(Exception):
                await self.intake.close()
        await self.core.close()  # sinks, then stores
        log.info("shutdown complete")


async def serve(
    cfg: C.Config,
    *,
    host: str | None = None,
    port: int | None = None,
    ready: Callable[[Service], None] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT: then drain, flush, checkpoint and return (exit 0)."""
    import uvicorn

    tune_gc()

    from ingest.api.app import build_app

    service = await Service.build(cfg)
    await service.start()
    app = build_app(service)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host or cfg.http.host,
            port=port if port is not None else cfg.http.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            # Longer than any Retry-After we answer, so a client that waited as told finds
            # its connection still open (a close racing its next POST looks like a failure).
            timeout_keep_alive=75,
        )
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Server._serve skips uvicorn's own signal capture: SIGTERM must drain the pipeline first.
    server_task = asyncio.create_task(server._serve())
    while not server.started and not server_task.done():
        await asyncio.sleep(0.02)
    if server_task.done():
        await service.shutdown(timeout=5)
        with contextlib.suppress(SystemExit):
            await server_task
        raise OSError(
            f"cannot serve HTTP on {server.config.host}:{server.config.port} "
            "(is the port in use? set http.port or INGEST_HTTP_PORT)"
        )
    if ready is not None:
        ready(service)
    await stop.wait()
    log.info("signal received")
    await service.shutdown()
    server.should_exit = True
    await server_task
