"""PostgresSink's straight COPY for all-new batches, its update-first upsert and its
fillfactor, on a real Postgres.

The straight COPY must be invisible but for its cost: any batch sequence gives the same
per-record outcomes and the same stored rows as the staged upsert alone, and as the plain
`INSERT ... ON CONFLICT` statement the upsert replaced; a stored entity makes it fall back
(nothing written twice) and backs off; revision updates stay on their page; a refused row
is not locked; the upsert probes the key, whatever the planner estimates.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.errors import ReasonCode
from ingest.records import Record, SinkResult
from ingest.sinks.postgres import _STAGED, COLUMNS, PostgresSink, _classify, _stage, _when
from tests.conftest import v3_body
from tests.integration.conftest import make_record, record_of, with_search_path

pytestmark = pytest.mark.integration

APPLIED = SinkResult.applied()
NEVER_COPY = 10**9  # copy_skip that keeps a sink on the staged upsert for the whole test


def upsert_only(sink: PostgresSink) -> PostgresSink:
    """The sink's full upsert for every batch: no straight COPY, no bare UPDATE first."""
    sink.copy_skip = NEVER_COPY
    sink.bare_skip = NEVER_COPY
    return sink


async def rows(sink: PostgresSink) -> list[tuple[Any, ...]]:
    """Every stored row (tombstones included), without updated_at, in key order."""
    cols = ", ".join([*COLUMNS, "prev_revision"])
    got = await sink.pool.fetch(
        f"SELECT {cols} FROM {sink.table} ORDER BY tenant, entity_type, entity_id"
    )
    return [tuple(r) for r in got]


def on_conflict_sql(t: str, timed: bool) -> str:
    """The staged upsert before update-first (main up to b646b0e), the reference: one
    `INSERT ... ON CONFLICT DO UPDATE` of every staged row, and the judging SELECT of then
    (a subquery per stored column; its columns in today's order). It takes the sink's
    parameters ($1 staged rows, $2 several records an entity) but ignores $2: its last branch
    always scans, so the sink's one-time filter on $2 is checked against it."""
    cols = ", ".join(COLUMNS)
    staged = ", ".join(c if timed else _STAGED.get(c, c) for c in COLUMNS)
    stage = _stage(t, timed)
    sets = (
        f"prev_revision = {t}.revision, "
        + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[3:])
        + ", updated_at = now()"
    )
    same = "(u.tenant, u.entity_type, u.entity_id) = (s.tenant, s.entity_type, s.entity_id)"
    stored = ", ".join(
        f"(SELECT o.{col} FROM {t} o WHERE o.tenant = s.tenant"
        " AND o.entity_type = s.entity_type AND o.entity_id = s.entity_id)"
        for col in ("revision", "dedupe_key", "prev_revision")
    )
    return f"""
WITH up AS (
    INSERT INTO {t} ({cols}, updated_at) SELECT {staged}, now() FROM {stage}
    ON CONFLICT (tenant, entity_type, entity_id) DO UPDATE SET {sets}
    WHERE {t}.revision < excluded.revision
    RETURNING tenant, entity_type, entity_id
)
SELECT s.tenant, s.entity_type, s.entity_id, false, {stored}
FROM {stage} s
WHERE (SELECT count(*) FROM up) < $1::bigint
  AND s.min_rev = s.revision AND NOT EXISTS (SELECT 1 FROM up u WHERE {same})
UNION ALL
SELECT s.tenant, s.entity_type, s.entity_id,
       (s.tenant, s.entity_type, s.entity_id) IN (SELECT * FROM up), {stored}
FROM {stage} s
WHERE $2::boolean IS NOT NULL AND s.min_rev < s.revision
"""


def on_conflict_only(sink: PostgresSink) -> PostgresSink:
    sink._upserts = {timed: on_conflict_sql(sink.table, timed) for timed in (True, False)}
    return upsert_only(sink)


@pytest.fixture
async def pair(pg_dsn: str) -> AsyncIterator[tuple[PostgresSink, PostgresSink]]:
    fast = PostgresSink("pg", pg_dsn, table="via_copy")
    slow = upsert_only(PostgresSink("pg", pg_dsn, table="via_upsert"))
    await fast.start()
    await slow.start()
    yield fast, slow
    await fast.close()
    await slow.close()


async def test_an_all_new_batch_goes_by_copy_with_the_upserts_rows_and_outcomes(
    pair: tuple[PostgresSink, PostgresSink],
) -> None:
    fast, slow = pair
    batch = [
        make_record("o1", 1),
        make_record("o2", 3),
        make_record("o1", 2),  # several records of one entity: only the winner is written
        make_record("o3", 1, deleted=True),  # a tombstone keeps its row
        make_record("o2", 1),  # older than its batch's winner
        make_record("o1", 2),  # the winner again
    ]
    got = await fast.write(batch)
    assert got == await slow.write(batch)
    assert [r.status.value for r in got] == [
        "applied",
        "applied",
        "applied",
        "applied",
        "failed",
        "unchanged",
    ]
    assert fast.paths == {"copy": 1, "fallback": 0, "upsert": 0}
    assert await rows(fast) == await rows(slow)
    assert len(await rows(fast)) == 3


async def test_a_stored_entity_makes_the_copy_fall_back_and_back_off(
    pair: tuple[PostgresSink, PostgresSink],
) -> None:
    fast, slow = pair
    for sink in pair:
        await sink.write([make_record("a", 1), make_record("b", 1)])
    mixed = [make_record("c", 1), make_record("a", 2), make_record("b", 1), make_record("d", 1)]
    got = await fast.write(mixed)
    assert got == await slow.write(mixed)
    assert [r.status.value for r in got] == ["applied", "applied", "unchanged", "applied"]
    assert fast.paths == {"copy": 1, "fallback": 1, "upsert": 0}
    assert await rows(fast) == await rows(slow)  # c and d once, by the upsert

    # The next 4 batches skip the COPY even though they are all new; the 5th tries again.
    for i in range(4):
        await fast.write([make_record(f"n{i}", 1)])
    assert fast.paths == {"copy": 1, "fallback": 1, "upsert": 4}
    await fast.write([make_record("a", 3)])  # tried, stored: falls back, now skips 8
    assert fast.paths == {"copy": 1, "fallback": 2, "upsert": 4}
    assert fast.copy_skip == 8
    for i in range(8):
        await fast.write([make_record(f"m{i}", 1)])
    assert await fast.write([make_record("new", 1)]) == [APPLIED]
    assert fast.paths == {"copy": 2, "fallback": 2, "upsert": 12}
    await fast.write([make_record("a", 4)])  # a success reset the backoff to 4
    assert fast.copy_skip == 4


async def test_a_bad_row_in_an_all_new_batch_fails_alone(
    pair: tuple[PostgresSink, PostgresSink],
) -> None:
    fast, slow = pair
    batch = [make_record("ok1", 1), make_record("x" * 300, 1), make_record("ok2", 1)]
    got, want = await fast.write(batch), await slow.write(batch)
    assert [(r.status, r.reason) for r in got] == [(r.status, r.reason) for r in want]
    assert [r.status.value for r in got] == ["applied", "failed", "applied"]
    assert got[1].detail is not None and got[1].detail["constraint"] == "via_copy_valid"
    assert fast.paths == {"copy": 0, "fallback": 1, "upsert": 0}
    assert fast.copy_skip == 0  # not a conflict: the next batch tries the COPY again
    assert await rows(fast) == await rows(slow)


TIMES = st.sampled_from(
    [
        "2026-01-02T03:04:05Z",
        "2026-01-02T03:04:05.123456+02:00",
        "2026-01-02T03:04:05.1234567Z",  # more digits than the server keeps: it rounds
        "2026-01-02T03:04:05",  # no offset: the server's TimeZone decides
        "1999-12-31T23:59:59.5-05:30",
    ]
)


@st.composite
def records(draw: st.DrawFn) -> Record:
    entity = draw(st.sampled_from(["e0", "e1", "e2", "e3", "e4"]))
    revision = draw(st.integers(0, 4))
    deleted = draw(st.booleans())
    body = v3_body(
        "acme",
        draw(st.sampled_from(["order", "customer"])),
        entity,
        revision,
        occurred_at=draw(TIMES),
        attributes={"v": draw(st.integers(0, 2))},
        relations=draw(st.sampled_from([(), [("OF", "customer", "c1")]])),
        deleted=deleted,
    )
    return record_of(body, source="t", seq=revision)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.lists(records(), min_size=1, max_size=8), min_size=1, max_size=5))
def test_any_batch_sequence_gives_the_upserts_outcomes_and_rows(
    pg_url: str, batches: list[list[Record]]
) -> None:
    async def go() -> None:
        schema = f"cp_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(pg_url)
        await admin.execute(f"CREATE SCHEMA {schema}")
        dsn = with_search_path(pg_url, schema)
        fast = PostgresSink("pg", dsn, table="via_copy")
        slow = upsert_only(PostgresSink("pg", dsn, table="via_upsert"))
        plain = on_conflict_only(PostgresSink("pg", dsn, table="via_conflict"))
        try:
            for sink in (fast, slow, plain):
                await sink.start()
            for batch in batches:
                fast.copy_skip = 0  # try the COPY on every batch, conflicts or not
                want = await plain.write(batch)
                assert await fast.write(batch) == want
                assert await slow.write(batch) == want
            assert await rows(fast) == await rows(plain)
            assert await rows(slow) == await rows(plain)
            assert fast.paths["copy"] + fast.paths["fallback"] == len(batches)
        finally:
            for sink in (fast, slow, plain):
                await sink.close()
            await admin.execute(f"DROP SCHEMA {schema} CASCADE")
            await admin.close()

    asyncio.run(go())


async def test_revision_updates_stay_on_their_page(pg_dsn: str) -> None:
    """fillfactor 50: the rev-2 version of every row of a full first load fits beside it (a
    HOT update, no new index entry); at 100 the first pages have no room for any."""
    sink = PostgresSink("pg", pg_dsn, table="hot")
    await sink.start()
    try:
        reloptions = await sink.pool.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = 'hot'::regclass"
        )
        assert reloptions == ["fillfactor=50"]
        await sink.write([make_record(f"o{i}", 1) for i in range(2000)])
        before = await sink.pool.fetch("SELECT entity_id, (ctid::text::point)[0] FROM hot")
        assert await sink.write([make_record(f"o{i}", 2) for i in range(2000)]) == [APPLIED] * 2000
        after = dict(
            (r[0], r[1])
            for r in await sink.pool.fetch("SELECT entity_id, (ctid::text::point)[0] FROM hot")
        )
        assert all(after[eid] == page for eid, page in before)
    finally:
        await sink.close()


async def test_an_older_revision_is_refused_without_waiting_for_a_row_lock(pg_dsn: str) -> None:
    """The update-first upsert locks only the rows it writes: an older revision of an entity
    another session holds locked (a reader's FOR UPDATE, a long writer) is refused at once.
    `INSERT ... ON CONFLICT DO UPDATE` locks every conflicting row before its guard, so it
    waited for the lock (and wrote a WAL record for it)."""
    sink = upsert_only(PostgresSink("pg", pg_dsn, table="locked"))
    await sink.start()
    other = await asyncpg.connect(pg_dsn)
    try:
        assert await sink.write([make_record("held", 5), make_record("free", 1)]) == [APPLIED] * 2
        async with other.transaction():
            await other.execute("SELECT 1 FROM locked WHERE entity_id = 'held' FOR UPDATE")
            older, newer = make_record("held", 3), make_record("free", 2)
            got = await asyncio.wait_for(sink.write([older, newer]), 15)
        assert [r.status.value for r in got] == ["failed", "applied"]
        assert got[0].reason is ReasonCode.OLDER_REVISION
        assert got[0].detail is not None and got[0].detail["stored_revision"] == 5
        assert [(r[2], r[3], r[9]) for r in await rows(sink)] == [("free", 2, 1), ("held", 5, None)]
    finally:
        await other.close()
        await sink.close()


async def test_the_upsert_probes_the_key_and_is_never_compiled(pg_dsn: str) -> None:
    """The UPDATE joins a never-analysed temp table to the table: left to its estimates the
    planner hashed the whole table for every batch (20k rows here, 5,000 staged), and JIT
    compiled every statement past ~7,500 staged rows. The sink's connections plan an index
    probe per staged row and never compile."""
    sink = PostgresSink("pg", pg_dsn, table="probe")
    await sink.start()
    try:
        for i in range(0, 20_000, 5_000):
            await sink.write([make_record(f"o{j}", 1) for j in range(i, i + 5_000)])
        rows_, timed = sink.staged_rows([make_record(f"o{j}", 2) for j in range(5_000)])
        async with sink.pool.acquire() as conn:
            assert await conn.fetchval("SHOW jit") == "off"
            async with conn.transaction():
                await conn.copy_records_to_table(
                    _stage("probe", timed), records=rows_, columns=[*COLUMNS, "min_rev"]
                )
                sql, args = sink._upserts[timed], (len(rows_), False)
                plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", *args))
                await conn.execute("SET LOCAL jit_above_cost = 0")  # would compile now
                analysed = "\n".join(
                    r[0] for r in await conn.fetch(f"EXPLAIN ANALYZE {sql}", *args)
                )
        assert "Index Scan using probe_pkey on probe o" in plan, plan
        assert "Hash Join" not in plan and "Merge Join" not in plan, plan
        assert "Seq Scan on probe " not in plan, plan
        assert "JIT" not in analysed, analysed
    finally:
        await sink.close()


async def test_a_batch_the_bare_update_cannot_write_whole_leaves_nothing_of_it(
    pg_dsn: str,
) -> None:
    """One record per entity, all stored at an older revision: the bare UPDATE writes the
    batch and commits. A batch it writes only part of (here one entity is new, one is a
    replay) is rolled back whole and judged by the upsert as if the bare UPDATE had never run:
    the same rows and outcomes as a sink that never tries it; the next batches skip it."""
    fast = PostgresSink("pg", pg_dsn, table="bare_fast")
    slow = upsert_only(PostgresSink("pg", pg_dsn, table="bare_slow"))
    await fast.start()
    await slow.start()
    try:
        for sink in (fast, slow):
            await sink.write([make_record(f"o{j}", 1) for j in range(6)])
        fast.copy_skip = NEVER_COPY
        batches = [
            [make_record(f"o{j}", 2) for j in range(6)],
            [make_record("o0", 3), make_record("o1", 2), make_record("new", 1)],
            [make_record(f"o{j}", 3) for j in range(1, 6)],
        ]
        for batch in batches:
            got = await fast.write(batch)
            assert got == await slow.write(batch)
            assert await rows(fast) == await rows(slow)
        assert fast.bare == {"written": 1, "short": 1}
        assert fast.bare_skip == 3  # the third batch skipped it: 4 batches after the short one
    finally:
        await fast.close()
        await slow.close()


async def test_an_existing_table_takes_the_configured_fillfactor(pg_dsn: str) -> None:
    old = PostgresSink("pg", pg_dsn, table="ff", fillfactor=100)
    await old.start()
    await old.write([make_record("o1", 1)])
    await old.close()
    sink = PostgresSink("pg", pg_dsn, table="ff", fillfactor=70)
    await sink.start()
    try:
        got = await sink.pool.fetchval("SELECT reloptions FROM pg_class WHERE oid = 'ff'::regclass")
        assert got == ["fillfactor=70"]
        assert len(await rows(sink)) == 1
    finally:
        await sink.close()
    with pytest.raises(ValueError, match="fillfactor"):
        PostgresSink("pg", pg_dsn, fillfactor=5)


async def started_beside_a_vacuum(dsn: str, table: str, fillfactor: int, bound: float) -> None:
    """Start (and close) a sink on `table`, made before with another fillfactor or the same,
    while a VACUUM runs on it (its lock, SHARE UPDATE EXCLUSIVE, held by another session);
    the start must return within `bound` s."""
    vacuum = await asyncpg.connect(dsn)
    try:
        async with vacuum.transaction():
            await vacuum.execute(f"LOCK TABLE {table} IN SHARE UPDATE EXCLUSIVE MODE")
            sink = PostgresSink("pg", dsn, table=table, fillfactor=fillfactor)
            await asyncio.wait_for(sink.start(), bound)
            await sink.close()
    finally:
        await vacuum.close()


async def reloptions(dsn: str, table: str) -> list[str] | None:
    conn = await asyncpg.connect(dsn)
    try:
        got: list[str] | None = await conn.fetchval(
            "SELECT reloptions FROM pg_class WHERE relname = $1", table
        )
        return got
    finally:
        await conn.close()


async def test_a_start_with_the_same_fillfactor_does_not_wait_for_a_vacuum(pg_dsn: str) -> None:
    """Setting the fillfactor takes a lock a running VACUUM holds (SHARE UPDATE EXCLUSIVE):
    a worker starting while an (anti-wraparound) vacuum runs must not wait when the table
    already has the configured fillfactor."""
    first = PostgresSink("pg", pg_dsn, table="vac")
    await first.start()
    await first.close()
    await started_beside_a_vacuum(pg_dsn, "vac", first.fillfactor, 5)


async def test_a_new_fillfactor_never_holds_a_start_behind_a_vacuum(pg_dsn: str) -> None:
    """The first start after an upgrade (or a changed fillfactor) must ALTER the table, which
    waits behind a running VACUUM: it gives up after a few seconds and starts anyway (the
    fillfactor is an optimisation); a later start applies it."""
    old = PostgresSink("pg", pg_dsn, table="vac2", fillfactor=100)
    await old.start()
    await old.close()
    await started_beside_a_vacuum(pg_dsn, "vac2", 50, 10)
    assert await reloptions(pg_dsn, "vac2") == ["fillfactor=100"]
    later = PostgresSink("pg", pg_dsn, table="vac2", fillfactor=50)
    await later.start()
    await later.close()
    assert await reloptions(pg_dsn, "vac2") == ["fillfactor=50"]


async def test_a_deadlock_between_writers_is_a_conflict_not_an_outage(pg_dsn: str) -> None:
    """Two workers copying overlapping new keys in different orders can deadlock: the worker
    tries again (SINK_TIMEOUT, conflict), and the breaker does not count it against the
    server (it was "CONNECTION_ERROR: unexpected")."""
    a, b = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
    try:
        await a.execute("CREATE TABLE dl (k int PRIMARY KEY); INSERT INTO dl VALUES (1), (2)")
        await a.execute("BEGIN; UPDATE dl SET k = k WHERE k = 1")
        await b.execute("BEGIN; UPDATE dl SET k = k WHERE k = 2")
        got = await asyncio.gather(
            a.execute("UPDATE dl SET k = k WHERE k = 2"),
            b.execute("UPDATE dl SET k = k WHERE k = 1"),
            return_exceptions=True,
        )
        deadlock = next(e for e in got if isinstance(e, BaseException))
        assert isinstance(deadlock, asyncpg.DeadlockDetectedError), got
        err = _classify(deadlock)
        assert err.reason is ReasonCode.SINK_TIMEOUT and err.conflict, err
    finally:
        await a.close()  # each open transaction ends with its connection
        await b.close()


TEXT = st.text(  # what a decoded record can hold; jsonb refuses \u0000
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.dictionaries(TEXT, JSON, max_size=5),
            st.sampled_from([(), [("OF", "customer", "c1")], [('ü"\\', "x", "é\n")]]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_the_json_columns_hold_what_the_server_makes_of_their_text(
    pg_url: str, docs: list[tuple[dict[str, Any], list[tuple[str, str, str]]]]
) -> None:
    """Both paths send the JSON columns as jsonb's wire bytes (the version byte, then
    `orjson.dumps`); what is stored must be exactly what the server makes of that JSON text
    (`convert_from(<bytes>, 'UTF8')::jsonb`, the staged upsert's cast before `_stage3_`):
    equal as jsonb and as text, for any attributes and relations, by either path."""

    async def go() -> None:
        schema = f"js_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(pg_url)
        await admin.execute(f"CREATE SCHEMA {schema}")
        dsn = with_search_path(pg_url, schema)
        fast = PostgresSink("pg", dsn, table="via_copy")
        slow = upsert_only(PostgresSink("pg", dsn, table="via_upsert"))
        batch = [
            make_record(f"e{i}", 1, attributes=attrs, relations=rels)
            for i, (attrs, rels) in enumerate(docs)
        ]
        try:
            await fast.start()
            await slow.start()
            for sink in (fast, slow):
                assert await sink.write(batch) == [APPLIED] * len(batch)
                for rec in batch:
                    attrs, rels = rec.body["attributes"], rec.body.get("relations")
                    same = await admin.fetchrow(
                        f"SELECT attributes = convert_from($1::bytea, 'UTF8')::jsonb,"
                        f" attributes::text = (convert_from($1::bytea, 'UTF8')::jsonb)::text,"
                        f" relations IS NOT DISTINCT FROM convert_from($2::bytea, 'UTF8')::jsonb,"
                        f" relations::text IS NOT DISTINCT FROM"
                        f"  (convert_from($2::bytea, 'UTF8')::jsonb)::text"
                        f" FROM {schema}.{sink.table} WHERE entity_id = $3",
                        orjson.dumps(attrs),
                        None if rels is None else orjson.dumps(rels),
                        rec.entity_id,
                    )
                    assert same is not None and tuple(same) == (True, True, True, True), (
                        sink.table,
                        attrs,
                        rels,
                    )
            assert slow.paths == {"copy": 0, "fallback": 0, "upsert": 1}
            assert await rows(fast) == await rows(slow)
        finally:
            await fast.close()
            await slow.close()
            await admin.execute(f"DROP SCHEMA {schema} CASCADE")
            await admin.close()

    asyncio.run(go())


@st.composite
def occurred(draw: st.DrawFn) -> str:
    """An RFC 3339-ish time: any fraction digits (0-9: the server rounds past 6), with or
    without an offset (without: the server's TimeZone decides)."""
    when = draw(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)))
    digits = draw(st.integers(0, 9))
    fraction = "".join(
        draw(st.lists(st.sampled_from("0123456789"), min_size=digits, max_size=digits))
    )
    fraction = "." + fraction if fraction else ""
    offset = draw(st.sampled_from(["Z", "+00:00", "+05:30", "-08:00", "+14:00", "-00:30", ""]))
    return when.strftime("%Y-%m-%dT%H:%M:%S") + fraction + offset


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(occurred(), min_size=1, max_size=6), st.booleans())
def test_the_staged_upsert_stores_the_time_the_server_makes_of_the_text(
    pg_url: str, times: list[str], update: bool
) -> None:
    """The staged upsert sends `occurred_at` as a timestamptz the client encodes (`_stage4_`)
    when it can encode every one of the batch exactly, else as text the server casts
    (`_stage3_`): either way the row holds `<text>::timestamptz`, new rows and updates."""

    async def go() -> None:
        schema = f"ts_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(pg_url)
        await admin.execute(f"CREATE SCHEMA {schema}")
        sink = upsert_only(PostgresSink("pg", with_search_path(pg_url, schema), table="t"))
        try:
            await sink.start()
            if update:  # the same entities stored first: the guarded UPDATE path
                await sink.write([make_record(f"e{i}", 0) for i in range(len(times))])
            batch = [make_record(f"e{i}", 1, occurred_at=t) for i, t in enumerate(times)]
            _, timed = sink.staged_rows(batch)
            assert timed == all(_when(t) is not None for t in times)
            assert await sink.write(batch) == [APPLIED] * len(batch)
            differ = await admin.fetch(
                f"SELECT u.txt, t.occurred_at FROM {schema}.t t JOIN unnest($1::text[],"
                " $2::text[]) u(id, txt) ON t.entity_id = u.id"
                " WHERE t.occurred_at IS DISTINCT FROM u.txt::timestamptz",
                [f"e{i}" for i in range(len(times))],
                times,
            )
            assert differ == []
        finally:
            await sink.close()
            await admin.execute(f"DROP SCHEMA {schema} CASCADE")
            await admin.close()

    asyncio.run(go())


def test_a_batch_is_staged_timed_only_when_every_time_is_exact() -> None:
    sink = PostgresSink("pg", "postgresql://unused/x")
    exact = make_record("a", 1, occurred_at="2026-01-02T03:04:05.123456+02:00")
    local = make_record("b", 1, occurred_at="2026-01-02T03:04:05")  # the server's TimeZone
    rows, timed = sink.staged_rows([exact])
    assert timed and rows[0][5] == _when("2026-01-02T03:04:05.123456+02:00")
    assert rows[0][-1] == 1  # min_rev
    rows, timed = sink.staged_rows([exact, local])
    assert not timed and [r[5] for r in rows] == [exact.body["occurred_at"], "2026-01-02T03:04:05"]


@given(st.lists(records(), min_size=1, max_size=8))
def test_a_staging_row_is_the_straight_copys_row_and_the_lowest_revision(
    batch: list[Record],
) -> None:
    """`_rows` builds the two layouts in separate branches (one tuple a row, no copy): the
    staging row must stay the straight COPY's row plus the entity's lowest revision."""
    sink = PostgresSink("pg", "postgresql://unused/x")
    low: dict[tuple[str, str, str], int] = {}
    for rec in batch:
        low[rec.entity_key] = min(rec.revision, low.get(rec.entity_key, rec.revision))
    straight = sink.copy_rows(batch)
    staged, timed = sink.staged_rows(batch, low)
    assert timed == (straight is not None)
    if straight is not None:
        pairs = zip(straight, batch, strict=True)
        assert staged == [(*row, low[rec.entity_key]) for row, rec in pairs]
    assert [row[-1] for row in sink.stage_rows(batch)] == [rec.revision for rec in batch]
