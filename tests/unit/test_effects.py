"""Exactly one effect per record: repeats (good or bad bytes) are duplicates, DLQ counts are
per record, a per-sink failure counter counts the rest; the DLQ rate follows.

Real SQLite stores; the sinks are the in-memory test doubles of test_worker.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.pipeline.decode import Decoder
from ingest.records import RawRecord, ReasonCode
from ingest.state.base import DLQFilter
from ingest.state.sqlite import SQLiteDB
from ingest.triage import analyze
from tests.unit.test_runner import line
from tests.unit.test_worker import FakeSleep, MemorySink, make_pipeline

BAD = [b"not json", b'{"schema_version":3}', b"[1,2]", line("x", 2**63), b"\xff\xfe"]
GOOD = [line(f"e{i}") for i in range(5)]


@pytest.fixture()
async def db(tmp_path: Path) -> AsyncIterator[SQLiteDB]:
    database = await SQLiteDB.open(tmp_path / "state.db")
    yield database
    await database.close()


def raws(lines: list[bytes], start: int = 0) -> list[RawRecord]:
    return [RawRecord(d, "t", "s", start + i, i, 0.0) for i, d in enumerate(lines)]


def sample(pipe: object, name: str, **labels: str) -> float:
    value = pipe.metrics.registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return float(value or 0.0)


async def test_a_repeated_bad_record_has_no_second_effect(db: SQLiteDB) -> None:
    """Bug: each repeat of a record that failed decoding was dead-lettered again
    (attempts +1, ingest_dlq_total +1, DLQ alerts firing again)."""
    pipe = make_pipeline(db, {"a": MemorySink("a")}, FakeSleep())
    batch = raws([b"not json", b"not json", line("e1")])
    first = await pipe.deliver(batch, Decoder().decode_many(batch))
    assert (first.dlq, first.duplicate, first.delivered) == (1, 1, 1)
    again = await pipe.deliver(batch, Decoder().decode_many(batch))
    assert (again.dlq, again.duplicate, again.delivered) == (0, 3, 0)
    [entry] = [e async for page in pipe.dlq.scan(DLQFilter()) for e in page]
    assert entry.attempts == 1
    assert sample(pipe, "ingest_dlq_total", tenant="t", source="s",
                  reason="VALIDATION_FAIL") == 1
    assert sample(pipe, "ingest_records_total", tenant="t", source="s", outcome="duplicate") == 4


async def test_a_record_failing_two_sinks_is_one_dlq_record(db: SQLiteDB) -> None:
    """Bug: ingest_dlq_total counted once per failing sink; dlqtriage printed a 200% rate."""
    a, b = MemorySink("a"), MemorySink("b")
    a.fail_next = [ReasonCode.CONSTRAINT_VIOLATION]
    b.fail_next = [ReasonCode.CONSTRAINT_VIOLATION]
    pipe = make_pipeline(db, {"a": a, "b": b}, FakeSleep())
    batch = raws([line("e1")])
    report = await pipe.deliver(batch, Decoder().decode_many(batch))
    assert report.dlq == 1 and len(report.dlq_entries) == 2
    assert sample(pipe, "ingest_dlq_total", tenant="t", source="s",
                  reason="CONSTRAINT_VIOLATION") == 1
    for sink in ("a", "b"):
        assert sample(pipe, "ingest_sink_failures_total", tenant="t", source="s", sink=sink,
                      reason="CONSTRAINT_VIOLATION") == 1
    flt = DLQFilter(tenant="t")
    summary = analyze.summarize(await pipe.dlq.groups(flt), await pipe.dlq.processed_total("t"),
                                await pipe.dlq.count_records(flt))
    assert summary.total == 2 and summary.dlq_records == 1 and summary.rate == 1.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.sampled_from(GOOD + BAD), min_size=1, max_size=8),
                min_size=1, max_size=6))
def test_every_distinct_record_has_exactly_one_effect(batches: list[list[bytes]]) -> None:
    """Any sequence of batches mixing good and bad bytes, repeats included: each distinct
    line is delivered or dead-lettered once; every other occurrence is a duplicate."""

    async def go() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            database = await SQLiteDB.open(Path(tmp) / "state.db")
            try:
                sink = MemorySink("a")
                pipe = make_pipeline(database, {"a": sink}, FakeSleep())
                seq = 0
                totals = {"delivered": 0, "dlq": 0, "duplicate": 0}
                for lines in batches:
                    batch = raws(lines, seq)
                    seq += len(lines)
                    report = await pipe.deliver(batch, Decoder().decode_many(batch))
                    totals["delivered"] += report.delivered
                    totals["dlq"] += report.dlq
                    totals["duplicate"] += report.duplicate
                distinct = {ln for b in batches for ln in b}
                n = sum(len(b) for b in batches)
                assert totals["delivered"] == len(distinct & set(GOOD))
                assert totals["dlq"] == len(distinct & set(BAD))
                assert totals["duplicate"] == n - len(distinct)
                entries = [e async for p in pipe.dlq.scan(DLQFilter()) for e in p]
                assert sorted(e.payload for e in entries) == sorted(distinct & set(BAD))
                assert all(e.attempts == 1 for e in entries)
                dlq_metric = sum(
                    s.value for m in pipe.metrics.registry.collect()
                    if m.name == "ingest_dlq" for s in m.samples if s.name == "ingest_dlq_total")
                assert dlq_metric == totals["dlq"]
            finally:
                await database.close()

    asyncio.run(go())
