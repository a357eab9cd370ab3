"""The Postgres sink's rows written by the compiled decoder (`Record.copy_row`, one binary
COPY buffer a batch) against the rows the sink encodes itself (the Python decoder's records),
on a real Postgres: the same outcome for every record (DLQ reasons and details included) and
the same stored rows, for any batch sequence of new rows, revision updates, replays, older
revisions, tombstones and hostile values (NUL, control characters, big numbers, deep JSON,
times the client cannot encode exactly).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingest.pipeline.decode import Decoder
from ingest.records import RawRecord, Record
from ingest.sinks.postgres import PostgresSink
from tests.integration.conftest import with_search_path
from tests.integration.test_postgres_copy_path import rows

pytestmark = pytest.mark.integration
native = pytest.importorskip("ingest_native", reason="the compiled extension is not built")

COMPILED = Decoder()
PYTHON = Decoder(native=False)
TIMES = [
    "2026-01-02T03:04:05Z",
    "2026-01-02T03:04:05.123456+02:00",
    "1999-12-31T23:59:59.5-05:30",
    "2026-01-02T03:04:05.1234567Z",  # more digits than the server keeps: the sink's own rows
    "2026-01-02T03:04:05.5+14:00",
]
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.sampled_from(["\u0000", "a\u0000b", '\u001f"\\', "é😀", "\u2028"]),
)
JSON = st.recursive(
    LEAF,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = {
        "schema_version": 3,
        "tenant_id": "acme",
        "entity_type": draw(st.sampled_from(["order", "customer"])),
        "entity_id": draw(st.sampled_from(["e0", "e1", "e2", "é3", "e\u00004", "e\u00015"])),
        "revision": draw(st.integers(0, 4)),
        "occurred_at": draw(st.sampled_from(TIMES)),
        "attributes": draw(
            st.dictionaries(st.sampled_from(["v", "w", "Zz", "é"]), JSON, max_size=3)
        ),
    }
    if draw(st.booleans()):
        body["relations"] = [
            {
                "type": "OF",
                "target_type": "customer",
                "target_id": draw(st.sampled_from(["c1", "c\u00002"])),
            }
        ]
    if draw(st.booleans()):
        body["deleted"] = draw(st.booleans())
    return orjson.dumps(body)


def line(entity_id: str, revision: int) -> bytes:
    body = {"schema_version": 3, "tenant_id": "acme", "entity_type": "order"}
    body.update(entity_id=entity_id, revision=revision, occurred_at=TIMES[1], attributes={})
    return orjson.dumps(body)


def decoded(decoder: Decoder, batch: list[bytes]) -> list[Record]:
    raws = [RawRecord(line, "acme", "t", i, i, time.time()) for i, line in enumerate(batch)]
    decoder.decode_many(raws)  # the first batch meets each time once (Python's part)
    out = decoder.decode_many(raws)
    assert all(isinstance(r, Record) for r in out), out
    return out  # type: ignore[return-value]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.lists(lines(), min_size=1, max_size=8), min_size=1, max_size=5))
@example(
    [
        [
            orjson.dumps(
                {
                    "schema_version": 3,
                    "tenant_id": "acme",
                    "entity_type": "order",
                    "entity_id": f"e{i}",
                    "revision": r,
                    "occurred_at": TIMES[0],
                    "attributes": {"v": r},
                }
            )
            for i in range(3)
        ]
        for r in (1, 2, 2, 1)
    ]
)
@example([[line("e0", 3)], [line("e0", 1), line("e0", 2), line("e0", 4), line("e1", 1)]])
def test_the_compiled_rows_store_what_the_sinks_own_rows_store(
    pg_url: str, batches: list[list[bytes]]
) -> None:
    async def go() -> None:
        schema = f"wr_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(pg_url)
        await admin.execute(f"CREATE SCHEMA {schema}")
        dsn = with_search_path(pg_url, schema)
        wired = PostgresSink("pg", dsn, table="via_wire")
        plain = PostgresSink("pg", dsn, table="via_tuples")
        try:
            for sink in (wired, plain):
                await sink.start()
            for batch in batches:
                fast, slow = decoded(COMPILED, batch), decoded(PYTHON, batch)
                assert all(r.copy_row is None for r in slow)
                for sink in (wired, plain):
                    sink.copy_skip = 0  # try the straight COPY on every batch
                assert await wired.write(fast) == await plain.write(slow)
            assert await rows(wired) == await rows(plain)
            assert wired.paths == plain.paths
        finally:
            for sink in (wired, plain):
                await sink.close()
            await admin.execute(f"DROP SCHEMA {schema} CASCADE")
            await admin.close()

    asyncio.run(go())


def test_the_compiled_records_carry_their_rows() -> None:
    """What the test above compares is the compiled rows (not two sinks' own rows)."""
    line = orjson.dumps(
        {
            "schema_version": 3,
            "tenant_id": "acme",
            "entity_type": "order",
            "entity_id": "e0",
            "revision": 1,
            "occurred_at": TIMES[0],
            "attributes": {},
        }
    )
    assert all(r.copy_row is not None for r in decoded(COMPILED, [line]))
