"""Builds the service's parts from its config: stores, sinks, sources and the delivery Core.

Which class serves each config `type` (or state `kind`) is spelled out in the three registries
below, `STORES`, `SINKS` and `SOURCES`: one entry maps the tag to its config model and its
builder (no registration by import side effect). Drivers are imported only when their type is
configured. `docs/config.md` and the config error paths are derived from these registries, so
a new sink is its module, its config model in `ingest/config.py` and one entry in `SINKS`.

The service (`ingest.service`), the CLIs, `ingest.triage` and `ingest.replay` build through
this module; nothing here knows how the service runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from ingest import config as C
from ingest.errors import ConfigError
from ingest.metrics import Metrics
from ingest.pipeline.admission import Admission, RateLimiter
from ingest.pipeline.breaker import CircuitBreaker
from ingest.pipeline.control import ControlFollower
from ingest.pipeline.decode import Decoder
from ingest.pipeline.retry import RetryPolicy
from ingest.pipeline.worker import Pipeline, SinkLane
from ingest.sinks.base import Sink
from ingest.sources.base import Source
from ingest.state.base import CheckpointStore, DLQStore, DroppedStore, IdempotencyStore
from ingest.state.control import ControlStore, MemoryControlStore, PostgresControlStore
from ingest.webhook import Intake

if TYPE_CHECKING:  # imported when their type is configured (objects and leases: asyncpg)
    from ingest.sources.objects import ItemSource
    from ingest.state.leases import LeaseStore
    from ingest.webhook.source import WebhookSource

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Shard = tuple[int, int]  # (i, n): worker i of a pod of n workers


def worker_id() -> str:
    """This process's identity in leases and checkpoints: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


# ---------------------------------------------------------------------- stores
@dataclass
class Stores:
    checkpoints: CheckpointStore
    idempotency: IdempotencyStore
    dlq: DLQStore
    dropped: DroppedStore
    health: Callable[[], Awaitable[dict[str, Any]]]
    close: Callable[[], Awaitable[None]]
    control: ControlStore  # the fleet's control record (what /admin/* set)
    sqlite_db: Any = None  # ingest.state.sqlite.SQLiteDB in embedded mode (intake, leases)
    pg_pool: Any = None  # asyncpg pool in production mode (leases)
    redis: Any = None  # redis.asyncio client in production (seen signatures, rate limits)


@dataclass(frozen=True)
class StoreKind(Generic[M]):
    """One `state.kind`: its config model and how to open its stores."""

    model: type[M]
    open: Callable[[C.Config, M], Awaitable[Stores]]


async def _open_sqlite(cfg: C.Config, state: C.SQLiteStateConfig) -> Stores:
    from ingest.state.sqlite import (
        SQLiteCheckpointStore,
        SQLiteDB,
        SQLiteDLQStore,
        SQLiteDroppedStore,
    )
    from ingest.state.sqlite_idem import SQLiteIdempotencyStore, open_idempotency_db

    db = await SQLiteDB.open(cfg.under_data_dir(state.path, "state.db"))
    try:
        idem_db = await open_idempotency_db(db)  # state.idem.db beside state.db
    except BaseException:
        await db.close()
        raise
    dlq = SQLiteDLQStore(db)

    async def sqlite_health() -> dict[str, Any]:
        return {"state": await dlq.health()}

    async def close() -> None:
        await idem_db.close()
        await db.close()

    return Stores(
        checkpoints=SQLiteCheckpointStore(db, worker_id()),
        idempotency=SQLiteIdempotencyStore(idem_db, state.idempotency_ttl_seconds),
        dlq=dlq,
        dropped=SQLiteDroppedStore(db),
        health=sqlite_health,
        close=close,
        control=MemoryControlStore(),  # embedded: per process, as before the fleet
        sqlite_db=db,
    )


async def _open_production(cfg: C.Config, state: C.ProductionStateConfig) -> Stores:
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
    await pg_dlq.warm()
    pg_control = PostgresControlStore(pool, state.postgres_url)
    await pg_control.ensure_schema()

    async def prod_health() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, probe in (("redis", idem.health), ("postgres", pg_dlq.health)):
            try:
                out[name] = await probe()
            except Exception as exc:
                out[name] = {"ok": False, "error": str(exc)}
        return out

    async def prod_close() -> None:
        await pg_control.close()
        await client.aclose()
        await pool.close()

    return Stores(
        checkpoints=RedisCheckpointStore(client, state.worker_id or worker_id()),
        idempotency=idem,
        dlq=pg_dlq,
        dropped=PostgresDroppedStore(pool),
        health=prod_health,
        close=prod_close,
        control=pg_control,
        pg_pool=pool,
        redis=client,
    )


STORES: dict[str, StoreKind[Any]] = {
    "sqlite": StoreKind(C.SQLiteStateConfig, _open_sqlite),
    "production": StoreKind(C.ProductionStateConfig, _open_production),
}


async def open_stores(cfg: C.Config) -> Stores:
    return await STORES[cfg.state.kind].open(cfg, cfg.state)


def lease_store(stores: Stores) -> LeaseStore:
    """Leases of S3 objects / SFTP files, next to the state (Postgres or the SQLite state.db)."""
    from ingest.state.leases import PostgresLeaseStore, SQLiteLeaseStore

    if stores.pg_pool is not None:
        return PostgresLeaseStore(stores.pg_pool)
    return SQLiteLeaseStore(stores.sqlite_db)


# ---------------------------------------------------------------------- sinks
@dataclass(frozen=True)
class SinkKind(Generic[M]):
    """One sink `type`: its config model and how to build it (no I/O until `start`);
    `reads_bodies`: its `write` reads each `Record.body` (the decoder then builds them at once
    for the routes that name it, `bodies_for`)."""

    model: type[M]
    build: Callable[[C.Config, M], Sink]
    reads_bodies: bool = False


def _sqlite_sink(cfg: C.Config, sc: C.SQLiteSinkConfig) -> Sink:
    from ingest.sinks.sqlite import SQLiteSink

    return SQLiteSink(sc.name, cfg.under_data_dir(sc.path, "sink.db"))


def _postgres_sink(cfg: C.Config, sc: C.PostgresSinkConfig) -> Sink:
    from ingest.sinks.postgres import PostgresSink

    dsn = sc.dsn or (
        cfg.state.postgres_url if isinstance(cfg.state, C.ProductionStateConfig) else None
    )
    if dsn is None:
        raise ConfigError(f"sinks[{sc.name}].dsn", "required when state is not production")
    return PostgresSink(sc.name, dsn, sc.table, sc.statement_timeout_ms, sc.fillfactor)


def _neo4j_sink(cfg: C.Config, sc: C.Neo4jSinkConfig) -> Sink:
    from ingest.sinks.neo4j import Neo4jSink

    return Neo4jSink(sc.name, sc.uri, sc.user, sc.password, sc.database)


def _typesense_sink(cfg: C.Config, sc: C.TypesenseSinkConfig) -> Sink:
    from ingest.sinks.typesense import TypesenseSink

    return TypesenseSink(sc.name, sc.url, sc.api_key, sc.fields, sc.timeout_seconds)


SINKS: dict[str, SinkKind[Any]] = {
    "sqlite": SinkKind(C.SQLiteSinkConfig, _sqlite_sink),
    "postgres": SinkKind(C.PostgresSinkConfig, _postgres_sink),
    "neo4j": SinkKind(C.Neo4jSinkConfig, _neo4j_sink, reads_bodies=True),
    "typesense": SinkKind(C.TypesenseSinkConfig, _typesense_sink, reads_bodies=True),
}


def build_sink(cfg: C.Config, sc: C.SinkConfig) -> Sink:
    return SINKS[sc.type].build(cfg, sc)


def bodies_for(cfg: C.Config) -> bool | Callable[[str, str], bool]:
    """The decoder's `bodies`: which records it builds with their body, for the routes whose
    sinks read it (the compiled decoder leaves it out, and a rebuild on first read costs
    twice the eager build). True or False when every route agrees, else per (tenant,
    entity_type) by `Config.sinks_for`."""
    readers = {sc.name for sc in cfg.sinks if SINKS[sc.type].reads_bodies}
    if not readers:
        return False
    routes = [r.sinks for r in cfg.routes]
    if not any(r.tenant == r.entity_type == "*" for r in cfg.routes):
        routes.append([sc.name for sc in cfg.sinks])  # what `sinks_for` falls back to
    reading = [not readers.isdisjoint(names) for names in routes]
    if all(reading) or not any(reading):
        return all(reading)

    def reads(tenant: str, entity_type: str) -> bool:
        return not readers.isdisjoint(cfg.sinks_for(tenant, entity_type))

    return reads


# ---------------------------------------------------------------------- sources
@dataclass
class BuiltSource:
    source: Source
    intake: Intake | None = None  # where the webhook handler makes bodies durable
    webhook: WebhookSource | None = None  # the embedded reader of that intake
    prepaid: bool = False  # its records took their tokens at the door (ingest.webhook)


@dataclass(frozen=True)
class SourceKind(Generic[M]):
    """One source `type`: its config model, how to build it, and how `replayctl` reads it
    (`objects`: list and read a time window without leases; `kafka`: a group of its own)."""

    model: type[M]
    build: Callable[[C.Config, M, Stores, Shard | None], Awaitable[BuiltSource]]
    replay: Literal["objects", "kafka"] | None = None


async def _inbox_source(
    cfg: C.Config, sc: C.InboxSourceConfig, stores: Stores, shard: Shard | None
) -> BuiltSource:
    from ingest.sources.inbox import InboxSource

    inbox_cfg = sc.model_copy(update={"path": cfg.under_data_dir(sc.path, "inbox")})
    limit = cfg.http.max_record_bytes
    if shard is None:
        return BuiltSource(InboxSource(inbox_cfg, stores.checkpoints, max_line_bytes=limit))
    leases = await _inbox_leases(cfg, stores)
    return BuiltSource(
        InboxSource(
            inbox_cfg,
            stores.checkpoints,
            leases=leases,
            owner=f"w{shard[0]}",
            max_line_bytes=limit,
        )
    )


async def _inbox_leases(cfg: C.Config, stores: Stores) -> LeaseStore:
    """The inbox is local to a pod, so are its leases: the SQLite state file, or a SQLite
    file of their own beside the inbox in production mode."""
    from ingest.state.leases import SQLiteLeaseStore
    from ingest.state.sqlite import SQLiteDB

    db = stores.sqlite_db or await SQLiteDB.open(cfg.data_dir / "inbox-leases.db")
    return SQLiteLeaseStore(db)


async def _webhook_source(
    cfg: C.Config, sc: C.WebhookSourceConfig, stores: Stores, shard: Shard | None
) -> BuiltSource:
    if sc.intake == "kafka":
        from ingest.sources.kafka import KafkaSource
        from ingest.webhook.kafka import KafkaIntake

        if not sc.brokers:
            raise ConfigError(f"sources[{sc.name}].brokers", "required for intake: kafka")
        intake = None
        if shard is None:  # in a pod the control plane owns the producer
            intake = KafkaIntake(sc.brokers, sc.topic)
            await intake.start()
        kcfg = C.KafkaSourceConfig(
            name=sc.name,
            brokers=sc.brokers,
            topics=[sc.topic],
            group_id=sc.group_id,
            batch_size=sc.batch_size,
        )
        return BuiltSource(
            KafkaSource(kcfg, max_record_bytes=cfg.http.max_record_bytes),
            intake=intake,
            prepaid=True,
        )
    from ingest.state.sqlite import SQLiteDB
    from ingest.webhook.source import WebhookSource
    from ingest.webhook.sqlite import SQLiteIntake

    db = stores.sqlite_db or await SQLiteDB.open(cfg.data_dir / "intake.db")
    sqlite_intake = SQLiteIntake(db)
    webhook = WebhookSource(
        sc, sqlite_intake, stores.checkpoints, shard=shard, spread=not cfg.transformers
    )
    return BuiltSource(webhook, intake=sqlite_intake, webhook=webhook, prepaid=True)


async def _kafka_source(
    cfg: C.Config, sc: C.KafkaSourceConfig, stores: Stores, shard: Shard | None
) -> BuiltSource:
    from ingest.sources.kafka import KafkaSource

    return BuiltSource(KafkaSource(sc, max_record_bytes=cfg.http.max_record_bytes))


def object_source(
    sc: C.S3SourceConfig | C.SFTPSourceConfig,
    stores: Stores,
    leases: LeaseStore,
    worker: str,
    max_line_bytes: int,
    shard: Shard | None = None,
) -> ItemSource[Any]:
    """An S3 or SFTP source; `replayctl` builds one too, to list and read without leasing.
    `shard` (i, n): worker i of n tries its stripe of each listing first (fewer lost leases)."""
    kind: type[ItemSource[Any]]
    if isinstance(sc, C.S3SourceConfig):
        from ingest.sources.s3 import S3Source as kind
    else:
        from ingest.sources.sftp import SFTPSource as kind
    return kind(
        sc,
        stores.checkpoints,
        leases,
        worker_id=worker,
        max_line_bytes=max_line_bytes,
        shard=shard,
    )


async def _leased_source(
    cfg: C.Config,
    sc: C.S3SourceConfig | C.SFTPSourceConfig,
    stores: Stores,
    shard: Shard | None,
) -> BuiltSource:
    leases = lease_store(stores)  # its table comes with the store's migrations
    # A stable state.worker_id lets a restarted worker take back its own leases at
    # once instead of waiting for them to expire.
    state = cfg.state
    wid = (
        state.worker_id + (f"-w{shard[0]}" if shard else "")
        if isinstance(state, C.ProductionStateConfig) and state.worker_id
        else worker_id()
    )
    return BuiltSource(object_source(sc, stores, leases, wid, cfg.http.max_record_bytes, shard))


SOURCES: dict[str, SourceKind[Any]] = {
    "inbox": SourceKind(C.InboxSourceConfig, _inbox_source),
    "webhook": SourceKind(C.WebhookSourceConfig, _webhook_source),
    "kafka": SourceKind(C.KafkaSourceConfig, _kafka_source, replay="kafka"),
    "s3": SourceKind(C.S3SourceConfig, _leased_source, replay="objects"),
    "sftp": SourceKind(C.SFTPSourceConfig, _leased_source, replay="objects"),
}


@dataclass
class SourceSet:
    sources: list[Source] = field(default_factory=list)
    intake: Intake | None = None  # for the webhook handler
    webhook: WebhookSource | None = None  # to wake on new rows and measure the intake
    prepaid: set[str] = field(default_factory=set)  # sources whose tokens the door took


async def build_sources(cfg: C.Config, stores: Stores, shard: Shard | None = None) -> SourceSet:
    """`shard` (i, n): worker i of a pod of n (ingest.pod), sharing the work through leases
    (inbox, S3, SFTP), the consumer group (Kafka) and intake partitions (webhooks)."""
    out = SourceSet()
    for sc in cfg.sources:
        built = await SOURCES[sc.type].build(cfg, sc, stores, shard)
        out.sources.append(built.source)
        if built.prepaid:
            out.prepaid.add(built.source.name)
        if built.intake is not None:
            out.intake = built.intake
            out.webhook = built.webhook
    return out


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
    control: ControlFollower  # follows the fleet's control record (run by the service)

    async def start_sinks(self, only: Collection[str] | None = None) -> dict[str, str]:
        """Start every sink (or those named); one that is down is started again on its first
        write. Returns the sinks that could not start, with why (for tools that must not
        run against an unreachable sink)."""
        down: dict[str, str] = {}
        for name, lane in self.lanes.items():
            if only is not None and name not in only:
                continue
            try:
                await asyncio.wait_for(lane.ensure_started(), 15.0)
            except Exception as exc:
                down[name] = str(exc) or type(exc).__name__
                log.error("sink %s could not start (%s); will retry on first write", name, exc)
        return down

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
    admission.limiter = rate_limiter(cfg, stores.redis) or admission.limiter
    control = ControlFollower(
        stores.control, admission, poll_seconds=cfg.fleet.control_poll_seconds
    )
    lanes: dict[str, SinkLane] = {}
    for sc in cfg.sinks:
        sink = build_sink(cfg, sc)
        breaker = CircuitBreaker.from_config(
            sc.name, cfg.breaker, on_change=lambda name, st: metrics.set_breaker(name, st.value)
        )
        lanes[sc.name] = SinkLane(sink, breaker)
        metrics.declare_sink(sc.name)
    decoder = Decoder(
        max_record_bytes=cfg.http.max_record_bytes,
        extra=extra,
        postgres_rows=any(sc.type == "postgres" for sc in cfg.sinks),  # Record.copy_row
        sqlite_rows=any(sc.type == "sqlite" for sc in cfg.sinks),  # Record.sqlite_row
        bodies=bodies_for(cfg),  # Record.body built at once where a sink reads it
    )
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
    return Core(cfg, stores, lanes, metrics, admission, decoder, pipeline, control)


def rate_limiter(cfg: C.Config, redis: Any) -> RateLimiter | None:
    """The fleet-wide GCRA in Redis (fleet.rate_limits: fleet, or auto in production mode);
    None keeps admission's local token buckets."""
    if cfg.fleet.rate_limits == "local" or redis is None:
        return None  # config validation refuses `fleet` without production state
    from ingest.state.ratelimit import RedisRateLimiter

    return RedisRateLimiter(redis, cfg.limits_for)


@dataclass
class FleetState:
    """What a pod's control plane shares with the fleet, opened without the pipeline's stores:
    the control record, the tenant limits (webhooks are admitted there) and, through
    `sqlite_db` / `pg_pool`, the replay plans it exports."""

    control: ControlStore
    limiter: RateLimiter | None
    close: Callable[[], Awaitable[None]]
    sqlite_db: Any = None
    pg_pool: Any = None


async def open_fleet_state(cfg: C.Config) -> FleetState:
    state = cfg.state
    if isinstance(state, C.SQLiteStateConfig):
        from ingest.state.sqlite import SQLiteDB

        db = await SQLiteDB.open(cfg.under_data_dir(state.path, "state.db"))
        return FleetState(MemoryControlStore(), None, db.close, sqlite_db=db)
    from ingest.state.postgres import connect_pool
    from ingest.state.redis import redis_client

    pool = await connect_pool(state.postgres_url, max_size=2)
    pg_control = PostgresControlStore(pool, state.postgres_url)
    await pg_control.ensure_schema()
    client = redis_client(state.redis_url)

    async def close() -> None:
        await pg_control.close()
        await client.aclose()
        await pool.close()

    return FleetState(pg_control, rate_limiter(cfg, client), close, pg_pool=pool)
