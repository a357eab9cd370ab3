"""PostgresSink against a real Postgres, beyond the sink contract (test_sink_contract.py): the
row layout, its own CHECK constraint, statement timeouts, a restarted server, connection limits,
a concurrent writer, a NUL anywhere in a record (generated)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.errors import SinkError
from ingest.records import ReasonCode, Record, SinkResult, SinkStatus
from ingest.sinks.postgres import PostgresSink
from tests.conftest import v3_body
from tests.integration.conftest import PrivateServer, make_record, record_of, with_search_path

pytestmark = pytest.mark.integration

APPLIED, UNCHANGED = SinkResult.applied(), SinkResult.unchanged()


@pytest.fixture
async def sink(pg_dsn: str) -> AsyncIterator[PostgresSink]:
    s = PostgresSink("pg", pg_dsn, table="entities")
    await s.start()
    yield s
    await s.close()


def reasons(results: list[SinkResult]) -> list[str]:
    return [r.reason.value if r.reason else r.status.value for r in results]


async def test_the_row_holds_the_winner_and_a_tombstone_keeps_its_row(sink: PostgresSink) -> None:
    """Storage layout; the judgements themselves are the contract's (test_sink_contract.py)."""
    batch = [make_record("o1", 1), make_record("o1", 3), make_record("o2", 5)]
    await sink.write(batch)
    row = await sink.fetch("acme", "order", "o1")
    assert row is not None and row["revision"] == 3 and row["deleted"] is False
    assert row["attributes"] == {"amount": 3, "n": "x"}
    assert row["relations"][0]["target_id"] == "c1"
    assert row["occurred_at"] == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert row["dedupe_key"] == batch[1].dedupe_key and row["prev_revision"] is None
    await sink.write([make_record("o1", 5, deleted=True)])
    row = await sink.fetch("acme", "order", "o1")
    assert row is not None and row["deleted"] is True and row["attributes"] is None
    assert (row["revision"], row["prev_revision"]) == (5, 3)
    assert await sink.count() == 2 and await sink.count(live_only=True) == 1


async def test_a_row_breaking_the_tables_check_names_it(sink: PostgresSink) -> None:
    batch = [make_record(f"o{i}", 1) for i in range(50)]
    batch[17] = make_record("x" * 300, 1)  # breaks CHECK length(entity_id) <= 256
    batch[33] = make_record("neg", -1)  # breaks CHECK revision >= 0
    results = await sink.write(batch)
    failed = [i for i, r in enumerate(results) if r.status is SinkStatus.FAILED]
    assert failed == [17, 33]
    for i in failed:
        detail = results[i].detail or {}
        assert results[i].reason is ReasonCode.CONSTRAINT_VIOLATION
        assert detail["constraint"] == "entities_valid"
        assert "entities_valid" in detail["message"]
    assert all(r == APPLIED for i, r in enumerate(results) if i not in failed)
    assert await sink.count() == 48


async def test_copy_raw_stores_row_of(sink: PostgresSink) -> None:
    recs = [make_record(f"r{i}", i) for i in range(100)]
    await sink.copy_raw([sink.row_of(r) for r in recs])
    assert await sink.count() == 100
    assert reasons(await sink.write([make_record("r7", 7), make_record("r8", 9)])) == [
        "unchanged",
        "applied",
    ]
    assert (await sink.health())["connected"] is True


async def test_statement_timeout_is_sink_timeout(pg_dsn: str) -> None:
    slow = PostgresSink("pg", pg_dsn, table="slow", statement_timeout_ms=100)
    await slow.start()
    try:
        await slow.pool.execute(
            "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$;"
            " CREATE TRIGGER slow_row BEFORE INSERT OR UPDATE ON slow"
            " FOR EACH ROW EXECUTE FUNCTION slow_row()"
        )
        t0 = time.monotonic()
        with pytest.raises(SinkError) as info:
            await slow.write([make_record("o1", 1)])
        assert info.value.reason is ReasonCode.SINK_TIMEOUT
        assert info.value.detail["error_class"] == "QueryCanceledError"
        assert time.monotonic() - t0 < 2
        assert await slow.count() == 0
    finally:
        await slow.close()


async def test_connection_loss_and_recovery(private_postgres: PrivateServer) -> None:
    sink = PostgresSink("pg", private_postgres.url, table="recover")
    await sink.start()
    try:
        assert reasons(await sink.write([make_record("o1", 1)])) == ["applied"]
        await asyncio.to_thread(private_postgres.run, "stop-server")
        t0 = time.monotonic()
        with pytest.raises(SinkError) as info:
            await sink.write([make_record("o1", 2)])
        assert info.value.reason is ReasonCode.CONNECTION_ERROR
        assert time.monotonic() - t0 < 5
        assert (await sink.health())["connected"] is False

        await asyncio.to_thread(private_postgres.run, "start-server")
        assert reasons(await sink.write([make_record("o1", 2)])) == ["applied"]
        assert (await sink.fetch("acme", "order", "o1") or {})["revision"] == 2
    finally:
        await sink.close()


async def test_too_many_connections_is_rate_limited(private_postgres: PrivateServer) -> None:
    private_postgres.superuser_sql("ALTER ROLE ingest CONNECTION LIMIT 1")
    holder = await asyncpg.connect(private_postgres.url)  # takes the one slot
    sink = PostgresSink("pg", private_postgres.url, table="limited")
    try:
        with pytest.raises(SinkError) as info:
            await sink.start()
        assert info.value.reason is ReasonCode.RATE_LIMITED
        assert info.value.detail["error_class"] == "TooManyConnectionsError"
    finally:
        private_postgres.superuser_sql("ALTER ROLE ingest CONNECTION LIMIT -1")
        await holder.close()
        await sink.close()


async def test_a_concurrent_writer_of_the_same_record_makes_it_unchanged(
    sink: PostgresSink, pg_dsn: str
) -> None:
    """Two workers write the same record at once (a rebalance replays a batch): the one that
    loses the row lock sees an equal revision committed, not an older one."""
    first = await sink.write([make_record("race", 1)])
    assert reasons(first) == ["applied"]
    rec = make_record("race", 2)
    other = await asyncpg.connect(pg_dsn)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "UPDATE entities SET revision = 2, dedupe_key = $1, prev_revision = 1"
            " WHERE tenant = 'acme' AND entity_type = 'order' AND entity_id = 'race'",
            rec.dedupe_key,
        )
        losing = asyncio.create_task(sink.write([rec]))  # waits on the row lock
        await asyncio.sleep(0.5)
        assert not losing.done()
        await tx.commit()
        assert reasons(await losing) == ["unchanged"]
        newer = make_record("race", 5)
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "UPDATE entities SET revision = 5, dedupe_key = $1, prev_revision = 2"
            " WHERE tenant = 'acme' AND entity_type = 'order' AND entity_id = 'race'",
            newer.dedupe_key,
        )
        older = asyncio.create_task(sink.write([make_record("race", 3)]))
        await asyncio.sleep(0.5)
        await tx.commit()
        result = (await older)[0]
        assert result.reason is ReasonCode.OLDER_REVISION
        assert result.detail is not None and result.detail["stored_revision"] == 5
    finally:
        await other.close()


NUL_PLACES = ("attribute key", "attribute value", "nested value", "list item", "relation",
              "entity id")  # fmt: skip


@st.composite
def with_nul(draw: st.DrawFn) -> tuple[str, str]:
    """(where, text): a text holding a NUL character somewhere, and where it goes."""
    text = draw(st.text(max_size=6))
    at = draw(st.integers(0, len(text)))
    return draw(st.sampled_from(NUL_PLACES)), text[:at] + "\x00" + text[at:]


def _nul_record(where: str, text: str, revision: int) -> Record:
    attributes: dict[str, Any] = {"amount": revision}
    entity_id, relations = "bad", [("PLACED_BY", "customer", "c1")]
    if where == "attribute key":
        attributes[text] = 1
    elif where == "attribute value":
        attributes["note"] = text
    elif where == "nested value":
        attributes["deep"] = {"a": [{"b": text}]}
    elif where == "list item":
        attributes["tags"] = ["x", text]
    elif where == "relation":
        relations = [("PLACED_BY", "customer", text)]
    else:
        entity_id = f"bad{text}"
    body = v3_body("acme", "order", entity_id, revision, attributes=attributes,
                   relations=relations)  # fmt: skip
    return record_of(body, source="test", seq=revision)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
# `fine`: any text a record can hold (no lone surrogate: the decoder refuses those, and
# canonical JSON cannot encode them), NUL aside
@given(
    with_nul(),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=6),
    st.booleans(),
)
def test_a_nul_anywhere_in_a_record_fails_that_record_alone(
    pg_url: str, bad: tuple[str, str], fine: str, stored_first: bool
) -> None:
    """jsonb and text cannot hold NUL (a valid JSON string can): the whole class, generated.
    The record is refused with CONSTRAINT_VIOLATION and its neighbours land, whichever path
    the batch takes (all new: straight COPY; an entity stored: the upsert)."""

    async def go() -> None:
        schema = f"nul_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(pg_url)
        await admin.execute(f"CREATE SCHEMA {schema}")
        sink = PostgresSink("pg", with_search_path(pg_url, schema), table="entities")
        try:
            await sink.start()
            if stored_first:
                assert reasons(await sink.write([make_record("ok1", 1)])) == ["applied"]
            batch = [make_record("ok1", 2, attributes={"note": fine}),
                     _nul_record(*bad, revision=3),
                     make_record("ok2", 1, attributes={fine: fine})]  # fmt: skip
            results = await sink.write(batch)
            assert reasons(results) == ["applied", "CONSTRAINT_VIOLATION", "applied"], bad
            assert await sink.count() == 2
        finally:
            await sink.close()
            await admin.execute(f"DROP SCHEMA {schema} CASCADE")
            await admin.close()

    asyncio.run(go())
