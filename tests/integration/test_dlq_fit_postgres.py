"""Production stores: the DLQ write is never the poison on Postgres (bigint, text and jsonb
refuse what SQLite takes), and a repeated bad record has no second effect with the
idempotency keys on Redis. Real servers (`scripts/services/up.sh postgres redis`)."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.config import parse_config
from ingest.metrics import Metrics
from ingest.pipeline.admission import Admission
from ingest.pipeline.breaker import CircuitBreaker
from ingest.pipeline.decode import Decoder
from ingest.pipeline.retry import RetryPolicy
from ingest.pipeline.worker import Pipeline, SinkLane
from ingest.records import DLQEntry, RawRecord, ReasonCode
from ingest.state.base import DLQFilter
from ingest.state.dlq_fit import add_fitted
from ingest.state.postgres import PostgresDLQStore, PostgresDroppedStore, connect_pool, migrate
from ingest.state.redis import RedisIdempotencyStore, redis_client
from tests._hostile import assert_stored, hostile_entries
from tests.integration.conftest import _drop_schema, _fresh_schema
from tests.unit.test_worker import MemorySink

pytestmark = pytest.mark.integration


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(hostile_entries(), min_size=1, max_size=6, unique_by=lambda e: e.dedupe_key))
def test_any_entry_is_stored_on_postgres(pg_url: str, entries: list[DLQEntry]) -> None:
    async def go() -> None:
        schema, dsn = await _fresh_schema(pg_url)
        pool = await connect_pool(dsn)
        try:
            await migrate(pool)
            store = PostgresDLQStore(pool)
            await add_fitted(store, entries)
            assert_stored(entries, [e async for page in store.scan(DLQFilter()) for e in page])
        finally:
            await pool.close()
            await _drop_schema(pg_url, schema)

    asyncio.run(go())


def line(eid: str, revision: int) -> bytes:
    return (b'{"schema_version":3,"tenant_id":"t","entity_type":"order","entity_id":"%s",'
            b'"revision":%d,"occurred_at":"2025-01-01T00:00:00Z","attributes":{}}'
            % (eid.encode(), revision))


async def test_out_of_range_revision_and_nul_on_production_stores(
        pg_url: str, redis_url: str) -> None:
    """Issue 11 #1 and #7 on Postgres + Redis: the DLQ row is written (bigint cannot hold
    2**63; text cannot hold NUL) and a repeat of the bad record is a duplicate."""
    schema, dsn = await _fresh_schema(pg_url)
    pool = await connect_pool(dsn)
    client = redis_client(redis_url)
    try:
        await migrate(pool)
        config = parse_config({"sinks": [{"type": "sqlite", "name": "a"}]})
        prefix = uuid.uuid4().hex[:8]
        pipe = Pipeline(
            config=config, admission=Admission(config.admission, config.limits_for),
            idempotency=RedisIdempotencyStore(client, 3600, prefix=f"test_{prefix}"),
            dlq=PostgresDLQStore(pool), dropped=PostgresDroppedStore(pool),
            lanes={"a": SinkLane(MemorySink("a"), CircuitBreaker("a"))},  # type: ignore[arg-type]
            metrics=Metrics(), retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_total=1),
            rng=random.Random(1),
        )
        nonce = uuid.uuid4().hex  # fresh bytes: the Redis keys of other runs do not match
        bad = [line(f"big-{nonce}", 2**63), line(f"nul\\u0000{nonce}", 2**64 + 5),
               line(f"neg-{nonce}", -(2**63) - 1)]
        raws = [RawRecord(d, "t", "webhook", i, i, 0.0) for i, d in enumerate(bad)]
        first = await pipe.deliver(raws, Decoder().decode_many(raws))
        assert first.dlq == 3
        rows: list[Any] = await pool.fetch("SELECT reason, revision, attempts, payload, detail"
                                           " FROM dlq ORDER BY id")
        assert [(r[0], r[1], r[2]) for r in rows] == [("VALIDATION_FAIL", None, 1)] * 3
        assert sorted(bytes(r[3]) for r in rows) == sorted(bad)
        again = await pipe.deliver(raws, Decoder().decode_many(raws))
        assert (again.dlq, again.duplicate) == (0, 3)
        assert [r[0] for r in await pool.fetch("SELECT attempts FROM dlq")] == [1, 1, 1]
        assert await pipe.dlq.count_records(DLQFilter(tenant="t")) == 3
        reason = ReasonCode.VALIDATION_FAIL.value
        assert pipe.metrics.registry.get_sample_value(
            "ingest_dlq_total", {"tenant": "t", "source": "webhook", "reason": reason}) == 3
    finally:
        await client.aclose()
        await pool.close()
        await _drop_schema(pg_url, schema)
