"""PostgresDLQStore, PostgresDroppedStore and migrations against a real Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from ingest.errors import StoreUnavailable
from ingest.records import DLQEntry, ReasonCode
from ingest.state.base import DLQFilter
from ingest.state.postgres import (
    PostgresDLQStore,
    PostgresDroppedStore,
    _filter_sql,
    connect_pool,
    migrate,
    migration_files,
)
from tests.integration.conftest import dlq_entry

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[Any]:
    p = await connect_pool(pg_dsn)
    assert await migrate(p) == [v for v, _, _ in migration_files()]
    yield p
    await p.close()


async def test_the_stores_pool_runs_without_jit(pool: Any) -> None:
    # every connection the pool opens, not only its first: JIT cost a new connection's
    # first statements 50-80 ms (asyncpg's type introspection) and never pays on these ones
    async with pool.acquire() as a, pool.acquire() as b:
        assert [await c.fetchval("SHOW jit") for c in (a, b)] == ["off", "off"]


def entry(n: int, *, at: datetime = T0, **kw: Any) -> DLQEntry:
    return dlq_entry(n, at=at, detail={"message": f"failure {n}", "path": "$.attributes"}, **kw)


async def test_migrations_are_versioned_and_idempotent(pool: Any) -> None:
    files = migration_files()
    assert [v for v, _, _ in files] == list(range(1, len(files) + 1))  # no gap, no repeat
    assert [n for _, n, _ in files][:3] == ["0001_dlq.sql", "0002_dropped.sql", "0003_audit.sql"]
    assert await migrate(pool) == []  # second run: nothing to do
    rows = await pool.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [(r[0], r[1]) for r in rows] == [(v, n) for v, n, _ in files]


async def test_add_is_an_upsert_per_key_and_sink(pool: Any) -> None:
    store = PostgresDLQStore(pool)
    await store.add([entry(1, attempts=2), entry(1, sink=None, reason=ReasonCode.SCHEMA_DRIFT)])
    later = T0 + timedelta(hours=1)
    again = entry(1, reason=ReasonCode.CONNECTION_ERROR, at=later, attempts=3)
    again.detail = {"message": "refused"}
    await store.add([again])
    await store.add([])
    assert await store.count(DLQFilter()) == 2
    [row] = [e async for page in store.scan(DLQFilter(sinks=["postgres"])) for e in page]
    assert row.attempts == 5
    assert row.reason is ReasonCode.CONNECTION_ERROR
    assert row.detail == {"message": "refused"}
    assert row.first_failed_at == T0 and row.last_failed_at == later
    assert row.payload == b'{"n": 1}' and row.revision == 1 and row.id is not None
    [pre] = [e async for page in store.scan(DLQFilter(sinks=["-"])) for e in page]
    assert pre.sink is None and pre.reason is ReasonCode.SCHEMA_DRIFT
    # the same key twice in one batch merges too (ON CONFLICT cannot touch a row twice)
    await store.add([entry(9), entry(9, attempts=4)])
    assert [e.attempts async for p in store.scan(DLQFilter(ids=[])) for e in p][-1] == 5


async def test_filters_groups_and_processed(pool: Any) -> None:
    store = PostgresDLQStore(pool)
    await store.add(
        [
            entry(1),
            entry(2, reason=ReasonCode.SCHEMA_DRIFT, sink=None, at=T0 + timedelta(days=1)),
            entry(3, tenant="other", source="kafka-main", at=T0 + timedelta(days=2)),
            entry(4, sink="neo4j", reason=ReasonCode.CONNECTION_ERROR, at=T0 + timedelta(days=3)),
            entry(5, sink="neo4j", reason=ReasonCode.CONNECTION_ERROR, at=T0 + timedelta(days=4)),
        ]
    )
    count = store.count
    assert await count(DLQFilter()) == 5
    assert await count(DLQFilter(tenant="acme")) == 4
    assert await count(DLQFilter(reasons=[ReasonCode.CONNECTION_ERROR])) == 2
    assert await count(DLQFilter(sources=["kafka-main"])) == 1
    assert await count(DLQFilter(sinks=["-", "neo4j"])) == 3
    assert await count(DLQFilter(since=T0 + timedelta(days=1), until=T0 + timedelta(days=3))) == 2
    assert await count(DLQFilter(older_than=T0 + timedelta(days=2))) == 2
    ids = [e.id async for p in store.scan(DLQFilter(tenant="other")) for e in p]
    assert await count(DLQFilter(ids=[i for i in ids if i is not None])) == 1

    groups = await store.groups(DLQFilter(tenant="acme"))
    assert groups[0].reason is ReasonCode.CONNECTION_ERROR and groups[0].sink == "neo4j"
    assert groups[0].count == 2 and groups[0].source == "s3-main"
    assert groups[0].oldest == T0 + timedelta(days=3)
    assert groups[0].newest == T0 + timedelta(days=4)
    assert {(g.reason, g.sink, g.count) for g in groups[1:]} == {
        (ReasonCode.SINK_TIMEOUT, "postgres", 1),
        (ReasonCode.SCHEMA_DRIFT, None, 1),
    }

    await store.record_processed({("acme", "s3-main"): 1000, ("other", "kafka-main"): 10})
    await store.record_processed({("acme", "s3-main"): 500})
    assert await store.processed_total("acme") == 1500
    assert await store.processed_total(None) == 1510
    assert await store.processed_total("nobody") == 0


async def test_scan_pages_interleave_with_delete_and_fail_again(pool: Any) -> None:
    store = PostgresDLQStore(pool)
    await store.add([entry(n) for n in range(1, 8)])
    seen: list[int] = []
    async for page in store.scan(DLQFilter(tenant="acme"), batch_size=3):
        assert len(page) <= 3
        ids = [e.id for e in page if e.id is not None]
        seen += ids
        assert await store.delete(ids[:1]) == 1  # deleting mid-scan skips nothing
        await store.fail_again(ids[-1], ReasonCode.RATE_LIMITED, {"message": "429"}, 2)
    assert seen == sorted(seen) and len(seen) == 7
    assert await store.count(DLQFilter()) == 4
    # pages [1,2,3] [4,5,6] [7]: 3 and 6 failed again; 7 was deleted before its fail_again
    again = await store.count(DLQFilter(reasons=[ReasonCode.RATE_LIMITED]))
    assert again == 2
    [e] = [e async for p in store.scan(DLQFilter(ids=[seen[2]])) for e in p]
    assert e.attempts == 3 and e.detail == {"message": "429"} and e.last_failed_at > T0
    assert await store.delete([]) == 0
    assert (await store.health())["connected"] is True


async def test_triage_queries_use_the_indexes(pool: Any) -> None:
    """EXPLAIN on 20k analysed rows: each triage filter shape picks its index."""
    await pool.execute(
        """
        INSERT INTO dlq (dedupe_key, sink, tenant, source, reason, payload, attempts,
                         first_failed_at, last_failed_at)
        SELECT int8send(i), (ARRAY['', 'postgres', 'neo4j', 'typesense', 'sqlite'])[i % 5 + 1],
               't' || (i % 40), 's3-main',
               (ARRAY['SCHEMA_DRIFT', 'VALIDATION_FAIL', 'OLDER_REVISION', 'SINK_TIMEOUT',
                      'CONSTRAINT_VIOLATION', 'CONNECTION_ERROR', 'RATE_LIMITED',
                      'CIRCUIT_OPEN'])[i % 8 + 1],
               '\\x00', 1, $1::timestamptz + i * interval '1 minute',
               $1::timestamptz + i * interval '1 minute'
        FROM generate_series(1, 20000) AS i
        """,
        T0,
    )
    await pool.execute("ANALYZE dlq")
    cases = {
        "dlq_tenant_reason_last_idx": DLQFilter(
            tenant="t3", reasons=[ReasonCode.SINK_TIMEOUT], since=T0 + timedelta(days=10)
        ),
        "dlq_tenant_sink_idx": DLQFilter(tenant="t3", sinks=["neo4j"]),
        "dlq_first_failed_idx": DLQFilter(older_than=T0 + timedelta(hours=3)),
    }
    for index, flt in cases.items():
        args: list[Any] = []
        sql = f"EXPLAIN SELECT count(*) FROM dlq WHERE {_filter_sql(flt, args)}"
        plan = "\n".join(r[0] for r in await pool.fetch(sql, *args))
        assert index in plan, plan


async def test_dropped_store(pool: Any) -> None:
    store = PostgresDroppedStore(pool)
    rows = [
        (bytes([i]) * 32, "acme" if i % 2 else "other", "inbox", b"p%d" % i, 1.5 + i)
        for i in range(1, 12)
    ]
    await store.add(rows)
    await store.add(rows[:3])  # idempotent on key
    await store.add([])
    assert await store.count() == 11
    assert await store.count("acme") == 6
    pages = [p async for p in store.scan("acme", batch_size=4)]
    assert [len(p) for p in pages] == [4, 2]
    flat = [r for p in pages for r in p]
    assert flat == sorted(r for r in rows if r[1] == "acme")  # exact round trip, key order
    assert await store.delete([r[0] for r in flat[:2]] + [b"missing"]) == 2
    assert await store.count("acme") == 4


async def test_unreachable_postgres_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable) as info:
        await connect_pool("postgresql://ingest:x@127.0.0.1:1/ingest")
    assert info.value.store == "postgres" and "x@" not in info.value.where


async def test_close_is_idempotent(pg_dsn: str) -> None:
    p = await connect_pool(pg_dsn)
    store = PostgresDLQStore(p)
    await store.close()
    await store.close()
    with pytest.raises((asyncpg.InterfaceError, StoreUnavailable)):
        await store.count(DLQFilter())


async def _prepared(pool: Any) -> list[int]:
    """Per connection of the pool: its server-side statements of `record_processed`."""
    conns = [await pool.acquire() for _ in range(pool.get_size())]
    try:
        return [
            await c.fetchval(
                "SELECT count(*) FROM pg_prepared_statements"
                " WHERE statement LIKE 'INSERT INTO dlq_processed%'"
            )
            for c in conns
        ]
    finally:
        for c in conns:
            await pool.release(c)


async def test_warm_prepares_the_processed_upsert_on_two_connections(pool: Any) -> None:
    """A batch's settle runs `record_processed` beside other uses of the pool; its first run
    on a connection cost a connect and asyncpg's prepare (~0.1-0.2 s at load, what every
    worker's first commit after a start waited for). `warm()` does both at start."""
    store = PostgresDLQStore(pool)
    assert await _prepared(pool) == [0]
    await store.warm()
    assert await _prepared(pool) == [1, 1]
    await store.record_processed({("t", "s"): 3})
    await store.record_processed({("t", "s"): 4})
    assert await store.processed_total("t") == 7
    assert await _prepared(pool) == [1, 1]  # no other statement prepared for it


async def test_the_services_dlq_store_starts_warm(pg_dsn: str, redis_url: str) -> None:
    """`open_stores` in production mode warms the DLQ store (`PostgresDLQStore.warm`)."""
    from ingest.config import parse_config
    from ingest.factory import open_stores

    cfg = parse_config(
        {"state": {"kind": "production", "redis_url": redis_url, "postgres_url": pg_dsn}}
    )
    stores = await open_stores(cfg)
    try:
        assert await _prepared(stores.dlq._pool) == [1, 1]  # type: ignore[attr-defined]
    finally:
        await stores.close()
