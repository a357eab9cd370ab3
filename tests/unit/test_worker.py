"""Pipeline.deliver: retry, breaker, per-sink outcomes, DLQ and claims, with real SQLite stores.

The sink here is a test double of the Sink protocol (an in-memory table that fails on demand):
it stands for "some sink", not for any real server, whose behaviour the integration tests cover.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.config import parse_config
from ingest.errors import SinkError
from ingest.metrics import Metrics
from ingest.pipeline.admission import Admission
from ingest.pipeline.breaker import CircuitBreaker
from ingest.pipeline.decode import Decoder
from ingest.pipeline.retry import RetryPolicy
from ingest.pipeline.worker import Pipeline, SinkLane, _together
from ingest.records import RawRecord, ReasonCode, Record, SinkResult
from ingest.sinks.base import judge_in_order, latest_per_entity
from ingest.state.base import DLQFilter
from ingest.state.sqlite import SQLiteDB, SQLiteDLQStore, SQLiteDroppedStore
from ingest.state.sqlite_idem import SQLiteIdempotencyStore


class MemorySink:
    kind = "memory"

    def __init__(self, name: str) -> None:
        self.name = name
        self.rows: dict[tuple[str, str, str], int] = {}
        self.fail_next: list[ReasonCode | SinkError] = []
        self.calls = 0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def health(self) -> dict[str, Any]:
        return {"connected": True}

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        self.calls += 1
        if self.fail_next:
            fail = self.fail_next.pop(0)
            if isinstance(fail, SinkError):
                raise fail
            raise SinkError(fail, f"injected {fail.value}")
        stored = {r.entity_key: self.rows.get(r.entity_key) for r in records}
        results = judge_in_order(records, stored)
        for rec in latest_per_entity(records):
            if stored[rec.entity_key] is None or rec.revision > (stored[rec.entity_key] or 0):
                self.rows[rec.entity_key] = rec.revision
        return results


class FakeSleep:
    def __init__(self) -> None:
        self.total = 0.0

    async def __call__(self, seconds: float) -> None:
        self.total += seconds


@pytest.fixture()
async def db(tmp_path: Path) -> AsyncIterator[SQLiteDB]:
    database = await SQLiteDB.open(tmp_path / "state.db")
    yield database
    await database.close()


def make_pipeline(db: SQLiteDB, sinks: dict[str, MemorySink], sleep: FakeSleep,
                  threshold: int = 10, **cfg: Any) -> Pipeline:
    config = parse_config({"sinks": [{"type": "sqlite", "name": n} for n in sinks], **cfg})
    lanes = {n: SinkLane(s, CircuitBreaker(n, failure_threshold=threshold, reset_timeout=30.0))
             for n, s in sinks.items()}
    return Pipeline(
        config=config, admission=Admission(config.admission, config.limits_for),
        idempotency=SQLiteIdempotencyStore(db), dlq=SQLiteDLQStore(db),
        dropped=SQLiteDroppedStore(db), lanes=lanes,  # type: ignore[arg-type]
        metrics=Metrics(), retry=RetryPolicy(max_attempts=4, base_delay=0.1, max_total=100),
        sleep=sleep, rng=random.Random(1),
    )


def batch(*specs: tuple[str, int]) -> tuple[list[RawRecord], list[Any]]:
    raws = [RawRecord(
        data=(b'{"schema_version":3,"tenant_id":"t","entity_type":"order","entity_id":"%s",'
              b'"revision":%d,"occurred_at":"2025-01-01T00:00:00Z","attributes":{}}'
              % (eid.encode(), rev)),
        tenant="t", source="s", seq=i, position=i, event_time=0.0)
        for i, (eid, rev) in enumerate(specs)]
    decoded = Decoder().decode_many(raws)
    return raws, decoded


async def test_retryable_failure_is_retried_then_delivered(db: SQLiteDB) -> None:
    sink = MemorySink("a")
    sink.fail_next = [ReasonCode.CONNECTION_ERROR, ReasonCode.SINK_TIMEOUT]
    sleep = FakeSleep()
    pipe = make_pipeline(db, {"a": sink}, sleep)
    report = await pipe.deliver(*batch(("e1", 1), ("e2", 1)))
    assert report.delivered == 2 and report.dlq == 0
    assert sink.calls == 3 and sink.rows == {("t", "order", "e1"): 1, ("t", "order", "e2"): 1}
    assert 0 <= sleep.total <= 0.1 + 0.2
    text = pipe.metrics.registry.get_sample_value(
        "ingest_retry_total", {"tenant": "t", "sink": "a", "reason": "CONNECTION_ERROR"})
    assert text == 2.0


async def test_exhausted_retries_go_to_dlq_with_attempts(db: SQLiteDB) -> None:
    sink = MemorySink("a")
    sink.fail_next = [ReasonCode.SINK_TIMEOUT] * 10
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    report = await pipe.deliver(*batch(("e1", 1)))
    assert report.dlq == 1 and report.delivered == 0
    entries = [e async for page in pipe.dlq.scan(DLQFilter()) for e in page]
    assert [(e.reason, e.sink, e.attempts) for e in entries] == [(ReasonCode.SINK_TIMEOUT, "a", 4)]
    # claimed: durable in the DLQ, so a repeat of the record is a duplicate
    again = await pipe.deliver(*batch(("e1", 1)))
    assert again.duplicate == 1 and sink.calls == 4


async def test_a_servers_retry_after_is_waited_and_kept_in_the_dlq(db: SQLiteDB) -> None:
    """A 429 with Retry-After: 7 (as the Typesense sink passes it on): the next attempt comes
    no sooner than 7 s, far above the policy's own 0.1 s backoff."""
    sink = MemorySink("a")
    sink.fail_next = [SinkError(ReasonCode.RATE_LIMITED, "429", retry_after=7.0)]
    sleep = FakeSleep()
    pipe = make_pipeline(db, {"a": sink}, sleep)
    report = await pipe.deliver(*batch(("e1", 1)))
    assert report.delivered == 1 and sink.calls == 2 and sleep.total == 7.0
    sink.fail_next = [SinkError(ReasonCode.RATE_LIMITED, "429", retry_after=500.0)]
    report = await pipe.deliver(*batch(("e2", 1)))  # a hint past max_total: to the DLQ now
    entries = [e async for page in pipe.dlq.scan(DLQFilter()) for e in page]
    assert report.dlq == 1 and sink.calls == 3 and sleep.total == 7.0
    assert [(e.reason, e.detail["retry_after_seconds"]) for e in entries] == [
        (ReasonCode.RATE_LIMITED, 500.0)]


async def test_conflicts_between_writers_are_retried_without_tripping_the_breaker(
    db: SQLiteDB,
) -> None:
    """A deadlock or a MERGE race (the Neo4j sink's `conflict=True`) says the sink works."""
    sink = MemorySink("a")
    sink.fail_next = [SinkError(ReasonCode.SINK_TIMEOUT, "deadlock", conflict=True)] * 3
    pipe = make_pipeline(db, {"a": sink}, FakeSleep(), threshold=2)
    report = await pipe.deliver(*batch(("e1", 1)))
    assert report.delivered == 1 and sink.calls == 4
    assert pipe.lanes["a"].breaker.state.value == "closed"
    sink.fail_next = [ReasonCode.SINK_TIMEOUT] * 2  # the same failures, not conflicts: open
    await pipe.deliver(*batch(("e2", 1)))
    assert pipe.lanes["a"].breaker.state.value == "open"


async def test_open_breaker_gives_circuit_open_without_touching_the_sink(db: SQLiteDB) -> None:
    sink = MemorySink("a")
    sink.fail_next = [ReasonCode.CONNECTION_ERROR] * 3
    pipe = make_pipeline(db, {"a": sink}, FakeSleep(), threshold=3)
    pipe.retry = RetryPolicy(max_attempts=3, base_delay=0.1, max_total=100)
    await pipe.deliver(*batch(("e1", 1)))  # three failures open the breaker (threshold 3)
    assert pipe.lanes["a"].breaker.state.value == "open"
    calls = sink.calls
    pipe.retry = RetryPolicy(max_attempts=1, base_delay=0.1, max_total=100)
    report = await pipe.deliver(*batch(("e2", 1)))
    assert sink.calls == calls
    entries = [e async for page in pipe.dlq.scan(DLQFilter()) for e in page]
    assert ReasonCode.CIRCUIT_OPEN in {e.reason for e in entries}
    assert report.dlq == 1


async def test_non_retryable_whole_batch_error_is_not_retried(db: SQLiteDB) -> None:
    sink = MemorySink("a")
    sink.fail_next = [ReasonCode.CONSTRAINT_VIOLATION]
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    report = await pipe.deliver(*batch(("e1", 1)))
    assert sink.calls == 1 and report.dlq == 1
    assert pipe.lanes["a"].breaker.state.value == "closed"


async def test_one_failing_sink_does_not_hold_back_the_other(db: SQLiteDB) -> None:
    good, bad = MemorySink("good"), MemorySink("bad")
    bad.fail_next = [ReasonCode.RATE_LIMITED] * 10
    pipe = make_pipeline(db, {"good": good, "bad": bad}, FakeSleep())
    report = await pipe.deliver(*batch(("e1", 1)))
    assert good.rows == {("t", "order", "e1"): 1} and bad.rows == {}
    entries = [e async for page in pipe.dlq.scan(DLQFilter()) for e in page]
    assert [(e.sink, e.reason) for e in entries] == [("bad", ReasonCode.RATE_LIMITED)]
    assert report.dlq == 1
    # the sink recovers; a redrive goes to the failed sink only
    bad.fail_next.clear()
    good_calls = good.calls
    raws, decoded = batch(("e1", 1))
    redo = await pipe.deliver(raws, decoded, check_duplicates=False, only_sinks=[{"bad"}])
    assert bad.rows == {("t", "order", "e1"): 1} and redo.delivered == 1
    assert good.calls == good_calls


async def test_duplicates_in_batch_and_across_batches_are_counted(db: SQLiteDB) -> None:
    sink = MemorySink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    first = await pipe.deliver(*batch(("e1", 1), ("e1", 1), ("e2", 3), ("e2", 2)))
    assert (first.delivered, first.duplicate, first.dlq) == (2, 1, 1)
    second = await pipe.deliver(*batch(("e1", 1), ("e2", 3)))
    assert second.duplicate == 2 and second.delivered == 0
    assert sink.rows == {("t", "order", "e1"): 1, ("t", "order", "e2"): 3}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([0.0, 1.5, 7.0, 2000.0]), min_size=1, max_size=12))
async def test_one_label_all_applied_batch_observes_each_event_time(
    tmp_path: Path, times: list[float]
) -> None:
    """The per-batch path (one tenant and source, every record applied) records one lag
    observation per record at its own event time: counts per bucket and sum exact."""
    database = await SQLiteDB.open(tmp_path / f"{uuid.uuid4().hex}.db")
    try:
        pipe = make_pipeline(database, {"a": MemorySink("a")}, FakeSleep())
        pipe.clock = lambda: 1000.0
        raws, _ = batch(*((f"e{i}", 1) for i in range(len(times))))
        raws = [RawRecord(r.data, r.tenant, r.source, r.seq, r.position, t)
                for r, t in zip(raws, times, strict=True)]
        report = await pipe.deliver(raws, Decoder().decode_many(raws))
        assert report.delivered == len(times)
        got = pipe.metrics.registry.get_sample_value
        labels = {"tenant": "t", "source": "s", "sink": "a"}
        assert got("ingest_lag_seconds_count", labels) == len(times)
        assert got("ingest_lag_seconds_sum", labels) == sum(max(0.0, 1000 - t) for t in times)
        assert got("ingest_lag_seconds_bucket", {**labels, "le": "0.5"}) == times.count(2000.0)
        assert got("ingest_lag_seconds_bucket", {**labels, "le": "+Inf"}) == len(times)
        assert await pipe.dlq.processed_total("t") == len(times)
    finally:
        await database.close()


async def test_brownout_drops_low_priority_deterministically_and_keeps_them(db: SQLiteDB) -> None:
    sink = MemorySink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    pipe.admission.brownout(0.5)
    raws = [RawRecord(
        data=(b'{"schema_version":3,"tenant_id":"t","entity_type":"order","entity_id":"e%d",'
              b'"revision":1,"occurred_at":"2025-01-01T00:00:00Z","attributes":{},'
              b'"priority":"%s"}' % (i, b"low" if i % 2 else b"high")),
        tenant="t", source="s", seq=i, position=i, event_time=0.0) for i in range(400)]
    decoded = Decoder().decode_many(raws)
    report = await pipe.deliver(raws, decoded)
    assert 50 < report.dropped < 150  # ~half of the 200 low-priority records
    assert report.delivered + report.dropped == 400
    assert await pipe.dropped.count("t") == report.dropped
    high = [r for r in decoded if isinstance(r, Record) and r.priority == "high"]
    assert all(r.entity_key in sink.rows for r in high)


class ScriptedSink(MemorySink):
    """Answers each record with the status its entity id was scripted to get."""

    def __init__(self, name: str, script: dict[str, str]) -> None:
        super().__init__(name)
        self.script = script

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        answer = {
            "applied": SinkResult.applied(),
            "unchanged": SinkResult.unchanged(),
            "failed": SinkResult.failed(ReasonCode.CONSTRAINT_VIOLATION, message="scripted"),
        }
        return [answer[self.script.get(r.entity_id, "applied")] for r in records]


statuses = st.sampled_from(["applied", "applied", "unchanged", "failed"])
batch_specs = st.lists(
    st.tuples(st.sampled_from(["t", "u"]), st.sampled_from(["s", "r"]), st.integers(0, 5),
              st.booleans(), statuses, statuses),
    min_size=1, max_size=12,
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_specs)
async def test_batch_counts_match_the_per_record_rule(tmp_path: Path, specs: list[Any]) -> None:
    """Per-batch shortcuts (one tenant/source, all applied) and the per-record path agree with
    the rule: dlq if any sink failed it, duplicate if all its sinks held it, else delivered;
    bytes that failed decoding are dlq once, then duplicates."""
    database = await SQLiteDB.open(tmp_path / f"{uuid.uuid4().hex}.db")
    try:
        script_a = {f"e{i}": a for i, (_, _, _, _, a, _) in enumerate(specs)}
        script_b = {f"e{i}": b for i, (_, _, _, _, _, b) in enumerate(specs)}
        sinks = {"a": ScriptedSink("a", script_a), "b": ScriptedSink("b", script_b)}
        pipe = make_pipeline(database, sinks, FakeSleep())  # type: ignore[arg-type]
        pipe.clock = lambda: 1000.0  # commit time: lag sums are exact
        raws = [RawRecord(
            data=(b'{"schema_version":3,"tenant_id":"%s","entity_type":"order","entity_id":"%s",'
                  b'"revision":%d,"occurred_at":"2025-01-01T00:00:00Z","attributes":{}}'
                  % (t.encode(), (f"e{i}" if not bad else "").encode(), rev))
            if not bad else b"not json",
            tenant=t, source=src, seq=i, position=i, event_time=float(rev))
            for i, (t, src, rev, bad, _, _) in enumerate(specs)]
        decoded = Decoder().decode_many(raws)
        report = await pipe.deliver(raws, decoded)
        want: Counter[tuple[str, str, str]] = Counter()
        lag: Counter[tuple[str, str, str]] = Counter()
        lag_sum: Counter[tuple[str, str, str]] = Counter()
        processed: Counter[str] = Counter()
        bad_seen: set[str] = set()  # the same bad bytes again (per tenant) are a duplicate
        for t, src, rev, bad, a, b in specs:
            processed[t] += 1
            if bad and t in bad_seen:
                outcome = "duplicate"
            elif bad or "failed" in (a, b):
                bad_seen.update([t] if bad else [])
                outcome = "dlq"
            elif a == b == "unchanged":
                outcome = "duplicate"
            else:
                outcome = "delivered"
            want[(t, src, outcome)] += 1
            for sink, status in (("a", a), ("b", b)):
                if not bad and status != "failed":
                    lag[(t, src, sink)] += 1
                    lag_sum[(t, src, sink)] += 1000 - rev  # event_time = revision
        got = pipe.metrics.registry.get_sample_value
        for (t, src, outcome), n in want.items():
            assert got("ingest_records_total",
                       {"tenant": t, "source": src, "outcome": outcome}) == n
        for (t, src, sink), n in lag.items():
            assert got("ingest_lag_seconds_count",
                       {"tenant": t, "source": src, "sink": sink}) == n
            assert got("ingest_lag_seconds_sum",
                       {"tenant": t, "source": src, "sink": sink}) == lag_sum[(t, src, sink)]
        for t in ("t", "u"):
            assert await pipe.dlq.processed_total(t) == processed[t]
        assert report.delivered == sum(n for k, n in want.items() if k[2] == "delivered")
        assert report.duplicate == sum(n for k, n in want.items() if k[2] == "duplicate")
        assert report.dlq == sum(n for k, n in want.items() if k[2] == "dlq")
        for sink in ("a", "b"):
            for rec in decoded:
                if isinstance(rec, Record):
                    result = report.result_for(rec, sink)
                    assert result is not None
                    scripted = (script_a if sink == "a" else script_b)[rec.entity_id]
                    assert result.status.value == scripted
    finally:
        await database.close()


async def test_settle_steps_run_together_and_a_failure_cancels_the_other() -> None:
    """`_together` (the settle's claims + processed counts): both run at once, and when one
    fails the other is cancelled before the error propagates, never left running."""
    started: list[str] = []
    slow_done = asyncio.Event()

    async def slow() -> None:
        started.append("slow")
        await asyncio.sleep(30)
        slow_done.set()

    async def fails() -> None:
        started.append("fails")
        await asyncio.sleep(0)
        raise RuntimeError("store down")

    before = set(asyncio.all_tasks())
    with pytest.raises(RuntimeError, match="store down"):
        await asyncio.wait_for(_together(slow(), fails()), 5)
    assert started == ["slow", "fails"]  # both were under way at once
    assert set(asyncio.all_tasks()) - before == set()  # nothing left running behind
    assert not slow_done.is_set()
