"""SourceRunner: no deadlock, no orphaned reads, no record able to stop its source.

The source here is a test double of the Source protocol (batches from a list, with hooks to
fail or hold); the pipeline is the real one on real SQLite stores with the in-memory sink of
test_worker. Each test names the bug it pins.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.errors import StoreUnavailable
from ingest.pipeline.decode import Decoder
from ingest.pipeline.progress import SourceProgress
from ingest.pipeline.runner import SourceRunner, _per_tenant
from ingest.pipeline.worker import Pipeline
from ingest.records import RawRecord, ReasonCode, Record, SinkResult
from ingest.sources.base import AdapterHealth, SourceBatch
from ingest.state.base import DLQFilter
from ingest.state.sqlite import SQLiteDB
from tests.unit.test_worker import FakeSleep, MemorySink, make_pipeline

TIMEOUT = 10.0


def line(eid: str, revision: int | str = 1, tenant: str = "t") -> bytes:
    return (
        b'{"schema_version":3,"tenant_id":"%s","entity_type":"order","entity_id":"%s",'
        b'"revision":%s,"occurred_at":"2025-01-01T00:00:00Z","attributes":{}}'
        % (tenant.encode(), eid.encode(), str(revision).encode())
    )


class ListSource:
    """Yields the given batches in order (each waits for `gates[i]` if set), then idles."""

    kind = "memory"

    def __init__(self, batches: Sequence[Sequence[bytes]], name: str = "mem") -> None:
        self.name = name
        self._batches = [list(b) for b in batches]
        self.gates: dict[int, asyncio.Event] = {}
        self.yielded = 0
        self.committed: list[int] = []
        self.fail_commit: list[BaseException] = []
        self._health = AdapterHealth(status="idle")
        self._stop = asyncio.Event()

    async def start(self) -> None: ...

    async def batches(self) -> AsyncIterator[SourceBatch]:
        seq = 0
        for i, lines in enumerate(self._batches):
            if i in self.gates:
                await self.gates[i].wait()
            raws = []
            for data in lines:
                seq += 1
                raws.append(RawRecord(data, "t", self.name, seq, i, 0.0))
            self.yielded += 1
            yield SourceBatch(raws, position=i, first_seq=raws[0].seq if raws else seq,
                              last_seq=seq)
        await self._stop.wait()

    async def commit(self, batch: SourceBatch) -> None:
        if self.fail_commit:
            raise self.fail_commit.pop(0)
        self.committed.append(batch.position)

    async def stop(self) -> None:
        self._stop.set()

    def health(self) -> AdapterHealth:
        return self._health

    async def close(self) -> None:
        self._stop.set()


@pytest.fixture()
async def db(tmp_path: Path) -> AsyncIterator[SQLiteDB]:
    database = await SQLiteDB.open(tmp_path / "state.db")
    yield database
    await database.close()


def runner(source: ListSource, pipe: Pipeline, stopping: asyncio.Event,
           decoder: Decoder | None = None) -> SourceRunner:
    return SourceRunner(source, pipe, decoder or Decoder(), pipe.admission, stopping=stopping,
                        on_pending=lambda n: None, progress=SourceProgress())


async def dlq_entries(pipe: Pipeline) -> list[Any]:
    return [e async for page in pipe.dlq.scan(DLQFilter()) for e in page]


async def run_until_committed(src: ListSource, pipe: Pipeline, n: int,
                              decoder: Decoder | None = None) -> None:
    stopping = asyncio.Event()
    task = asyncio.create_task(runner(src, pipe, stopping, decoder).run())
    async with asyncio.timeout(TIMEOUT):
        while len(src.committed) < n:
            await asyncio.sleep(0.01)
    stopping.set()
    await asyncio.wait_for(task, TIMEOUT)


async def test_consumer_failure_with_a_full_queue_ends_the_run_instead_of_hanging(
        db: SQLiteDB) -> None:
    """Bug: the reader waited forever at `await queue.put(None)` on a full queue once the
    consumer had died, so the runner never returned and was never restarted."""
    src = ListSource([[line(f"e{i}")] for i in range(6)])
    src.fail_commit = [RuntimeError("commit exploded")]
    pipe = make_pipeline(db, {"a": MemorySink("a")}, FakeSleep())
    with pytest.raises(RuntimeError, match="commit exploded"):
        await asyncio.wait_for(runner(src, pipe, asyncio.Event()).run(), TIMEOUT)


async def test_a_read_in_progress_is_cancelled_with_the_reader(db: SQLiteDB) -> None:
    """Bug: when the reader was cancelled while waiting for the next batch, that `anext` task
    kept running: the batch it read later was never delivered (and the source thought it
    was in flight)."""
    src = ListSource([[line("e1")], [line("e2")]])
    src.gates[1] = asyncio.Event()  # the second batch arrives only later
    src.fail_commit = [RuntimeError("commit exploded")]
    pipe = make_pipeline(db, {"a": MemorySink("a")}, FakeSleep())
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(runner(src, pipe, asyncio.Event()).run(), TIMEOUT)
    src.gates[1].set()
    await asyncio.sleep(0.1)
    assert src.yielded == 1  # nobody read batch 2 into the void


async def test_the_next_batch_is_read_while_one_is_decoded_off_the_event_loop(
        db: SQLiteDB) -> None:
    """Before: the reader asked the source for batch N+1 only once N was decoded and queued,
    and the decode held the event loop (25-70 ms a 5,000-record batch under load), so a Kafka
    poll thread waited for room and the sinks' answers waited for the decode. Now N+1 is read
    while N is decoded, and the decode runs on a thread of its own."""
    src = ListSource([[line("e1")], [line("e2")], [line("e3")]])
    seen: list[tuple[int, int, bool]] = []

    class Watching(Decoder):
        def decode_batch(self, raws: Sequence[RawRecord], *, facts: bool = True) -> Any:
            on_loop = threading.current_thread() is threading.main_thread()
            seen.append((raws[0].seq, src.yielded, on_loop))
            return super().decode_batch(raws, facts=facts)

    sink = MemorySink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    await run_until_committed(src, pipe, 3, Watching())
    assert seen[0] == (1, 2, False)  # batch 2 was read before batch 1's decode began
    assert not any(on_loop for _, _, on_loop in seen)
    assert set(sink.rows) == {("t", "order", e) for e in ("e1", "e2", "e3")}
    assert src.committed == [0, 1, 2]


async def test_a_record_that_makes_the_decoder_raise_is_isolated(db: SQLiteDB) -> None:
    class Fragile(Decoder):
        def decode_batch(self, raws: Sequence[RawRecord], *, facts: bool = True) -> Any:
            if any(b"boom" in r.data for r in raws):
                raise ZeroDivisionError("boom")
            return super().decode_batch(raws, facts=facts)

    sink = MemorySink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    src = ListSource([[line("e1"), line("boom"), line("e3")], [line("e4")]])
    await run_until_committed(src, pipe, 2, Fragile())
    assert set(sink.rows) == {("t", "order", e) for e in ("e1", "e3", "e4")}
    [entry] = await dlq_entries(pipe)
    assert entry.reason is ReasonCode.VALIDATION_FAIL and entry.sink is None
    assert entry.detail["kind"] == "unexpected_error"
    assert entry.detail["error_class"] == "ZeroDivisionError" and entry.detail["stage"] == "decode"
    assert entry.payload == line("boom")


async def test_an_out_of_range_revision_is_dead_lettered_not_a_stranded_batch(
        db: SQLiteDB) -> None:
    """Bug: revision 2**63 raised OverflowError writing its DLQ row; the batch was stranded."""
    sink = MemorySink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    src = ListSource([[line("e1"), line("e2", 2**63), line("e3", -(2**70))], [line("e4")]])
    await run_until_committed(src, pipe, 2)
    assert set(sink.rows) == {("t", "order", e) for e in ("e1", "e4")}
    entries = {e.entity_id: e for e in await dlq_entries(pipe)}
    assert entries["e2"].revision is None and entries["e2"].reason is ReasonCode.VALIDATION_FAIL
    assert entries["e2"].payload == line("e2", 2**63)  # the original bytes, untouched
    assert entries["e3"].reason is ReasonCode.VALIDATION_FAIL


class PoisonSink(MemorySink):
    """Raises something unclassified whenever a batch holds the entity 'poison'."""

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        self.calls += 1
        if any(r.entity_id == "poison" for r in records):
            raise TypeError("cannot adapt value")
        self.calls -= 1
        return await super().write(records)


async def test_a_record_the_sink_chokes_on_is_isolated_and_the_rest_written(
        db: SQLiteDB) -> None:
    sink = PoisonSink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    batch = [line(f"e{i}") for i in range(7)] + [line("poison")] + [line("e9")]
    src = ListSource([batch])
    await run_until_committed(src, pipe, 1)
    assert len(sink.rows) == 8 and ("t", "order", "poison") not in sink.rows
    [entry] = await dlq_entries(pipe)
    assert entry.reason is ReasonCode.VALIDATION_FAIL and entry.sink == "a"
    assert entry.detail["kind"] == "unexpected_error" and entry.detail["error_class"] == "TypeError"
    assert pipe.lanes["a"].breaker.state.value == "closed"  # a record is not an outage


async def test_bookkeeping_that_raises_for_one_record_is_isolated(db: SQLiteDB) -> None:
    pipe = make_pipeline(db, {"a": MemorySink("a")}, FakeSleep())
    poisoned = Decoder().decode(RawRecord(line("e2"), "t", "mem", 1, 0, 0.0))
    assert isinstance(poisoned, Record)
    real_claim = pipe.idempotency.claim

    async def claim(keys: Sequence[bytes]) -> None:
        if poisoned.dedupe_key in keys:
            raise ValueError("index out of range")
        await real_claim(keys)

    pipe.idempotency.claim = claim  # type: ignore[method-assign]
    src = ListSource([[line("e1"), line("e2"), line("e3")], [line("e4")]])
    await run_until_committed(src, pipe, 2)
    [entry] = await dlq_entries(pipe)
    assert entry.entity_id == "e2" and entry.detail["stage"] == "deliver"
    assert entry.detail["error_class"] == "ValueError"
    assert pipe.metrics.registry.get_sample_value(
        "ingest_poison_isolations_total", {"stage": "deliver"}) >= 1


async def test_stopping_during_a_store_outage_leaves_the_batch_uncommitted(
        db: SQLiteDB) -> None:
    """Bug: SIGTERM waited the full shutdown timeout while a store (or the disk) was down."""
    pipe = make_pipeline(db, {"a": MemorySink("a")}, FakeSleep())
    pipe.sleep = asyncio.sleep  # type: ignore[method-assign]

    async def down(keys: Sequence[bytes]) -> None:
        raise StoreUnavailable("idempotency", "here", "down")

    pipe.idempotency.claim = down  # type: ignore[method-assign]
    stopping = asyncio.Event()
    pipe.stopping = stopping
    src = ListSource([[line("e1")]])
    task = asyncio.create_task(runner(src, pipe, stopping).run())
    await asyncio.sleep(0.5)
    assert not task.done()  # waiting for the store, as it should
    stopping.set()
    await asyncio.wait_for(task, 2.0)  # gives up promptly instead of waiting the store out
    assert src.committed == []


def test_unexpected_failure_detail_is_json() -> None:
    from ingest.pipeline.isolate import unexpected_failure

    failure = unexpected_failure(OverflowError("int too big"), "deliver", {"revision": 2**70})
    assert orjson.loads(orjson.dumps(failure.detail))["error_class"] == "OverflowError"


def key_of(data: bytes) -> bytes:
    rec = Decoder().decode(RawRecord(data, "t", "mem", 1, 0, 0.0))
    assert isinstance(rec, Record)
    return rec.dedupe_key


def hold_claims(pipe: Pipeline, data: bytes) -> asyncio.Event:
    """The claim of `data`'s record waits for the returned event: its batch stays settling."""
    release, real_claim, held = asyncio.Event(), pipe.idempotency.claim, key_of(data)

    async def claim(keys: Sequence[bytes]) -> None:
        if held in keys:
            await release.wait()
        await real_claim(keys)

    pipe.idempotency.claim = claim  # type: ignore[method-assign]
    return release


async def test_the_next_batch_is_written_while_a_disjoint_one_settles(db: SQLiteDB) -> None:
    sink = MemorySink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    release = hold_claims(pipe, line("e1"))
    src = ListSource([[line("e1")], [line("e2")]])
    stopping = asyncio.Event()
    task = asyncio.create_task(runner(src, pipe, stopping).run())
    async with asyncio.timeout(TIMEOUT):
        while ("t", "order", "e2") not in sink.rows:
            await asyncio.sleep(0.01)
    assert src.committed == []  # batch 0 still settling, batch 1 already in the sink
    release.set()
    async with asyncio.timeout(TIMEOUT):
        while len(src.committed) < 2:
            await asyncio.sleep(0.01)
    assert src.committed == [0, 1]  # commits stay in read order
    stopping.set()
    await asyncio.wait_for(task, TIMEOUT)


async def test_a_batch_sharing_an_entity_waits_until_the_previous_one_settled(
        db: SQLiteDB) -> None:
    """Why: a kill while revision 2 is written and revision 1's batch is unsettled would
    replay revision 1 against revision 2 and dead-letter it as a false OLDER_REVISION."""
    sink = MemorySink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    release = hold_claims(pipe, line("e1", 1))
    src = ListSource([[line("e1", 1)], [line("x"), line("e1", 2)]])
    stopping = asyncio.Event()
    task = asyncio.create_task(runner(src, pipe, stopping).run())
    await asyncio.sleep(0.3)
    assert sink.rows == {("t", "order", "e1"): 1} and src.committed == []
    release.set()
    async with asyncio.timeout(TIMEOUT):
        while len(src.committed) < 2:
            await asyncio.sleep(0.01)
    assert sink.rows[("t", "order", "e1")] == 2 and await dlq_entries(pipe) == []
    stopping.set()
    await asyncio.wait_for(task, TIMEOUT)


class CountingSink(MemorySink):
    """Slow writes that note how many were ever under way at once."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.active = self.most = 0

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            await asyncio.sleep(0.2 if any(r.entity_id.startswith("slow") for r in records) else 0)
            return await super().write(records)
        finally:
            self.active -= 1


async def test_a_settle_falling_back_to_isolation_never_writes_beside_the_next_batch(
        db: SQLiteDB) -> None:
    """Bug: the isolation of a batch whose settling raised wrote it again while the next
    batch was in the sink: two writes at once on one sink connection."""
    sink = CountingSink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    poisoned, real_claim = key_of(line("e2")), pipe.idempotency.claim

    async def claim(keys: Sequence[bytes]) -> None:
        if poisoned in keys:
            raise ValueError("index out of range")
        await real_claim(keys)

    pipe.idempotency.claim = claim  # type: ignore[method-assign]
    src = ListSource([[line("e1"), line("e2")], [line("slow"), line("e3")]])
    await run_until_committed(src, pipe, 2)
    assert sink.most == 1
    assert set(sink.rows) == {("t", "order", e) for e in ("e1", "e2", "slow", "e3")}
    [entry] = await dlq_entries(pipe)
    assert entry.entity_id == "e2" and entry.detail["stage"] == "deliver"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["acme", "beta", "gamma"]), max_size=30))
def test_tokens_per_tenant_are_the_records_of_each_tenant(tenants: list[str]) -> None:
    """`_admit` takes, per tenant, exactly as many tokens as the batch has records of it,
    whether the batch has one tenant (the set shortcut) or several."""
    raws = [RawRecord(b"{}", t, "src", i, None, 0.0) for i, t in enumerate(tenants)]
    assert _per_tenant(raws) == Counter(tenants)


class SlowCommits(ListSource):
    """Commits that wait: for `hold` (while it is clear) or for a drawn number of loop turns;
    notes which batches were committed when each sink write began."""

    def __init__(self, batches: Sequence[Sequence[bytes]], turns: Sequence[int] = ()) -> None:
        super().__init__(batches)
        self.hold = asyncio.Event()
        self.hold.set()
        self.turns = list(turns)

    async def commit(self, batch: SourceBatch) -> None:
        await self.hold.wait()
        for _ in range(self.turns[batch.position] if batch.position < len(self.turns) else 0):
            await asyncio.sleep(0)
        await super().commit(batch)


async def test_a_slow_commit_no_longer_holds_up_the_next_batches(db: SQLiteDB) -> None:
    """Why: the commit ran inside the settle of its batch, and the next batch's write waited
    for that settle, so every checkpoint round trip (a Kafka offset commit: 40 ms at the
    median, up to 1.4 s on a loaded machine) was on the path of every batch. Now commits run
    behind, in read order: later disjoint batches are written and settled meanwhile."""
    sink = MemorySink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    src = SlowCommits([[line(f"e{i}")] for i in range(4)])
    src.hold.clear()
    stopping = asyncio.Event()
    task = asyncio.create_task(runner(src, pipe, stopping).run())
    async with asyncio.timeout(TIMEOUT):
        while len(sink.rows) < 4:  # the old code wrote 2 and waited for commit 0
            await asyncio.sleep(0.01)
    assert src.committed == []
    src.hold.set()
    async with asyncio.timeout(TIMEOUT):
        while len(src.committed) < 4:
            await asyncio.sleep(0.01)
    assert src.committed == [0, 1, 2, 3]
    stopping.set()
    await asyncio.wait_for(task, TIMEOUT)


async def test_a_batch_sharing_an_entity_with_an_uncommitted_one_waits_for_its_commit(
        db: SQLiteDB) -> None:
    """Why: a kill after revision 2's write, with revision 1's batch settled but not yet
    committed, would replay revision 1 against revision 2. Batches not yet committed share
    no entity."""
    sink = MemorySink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    src = SlowCommits([[line("e1", 1)], [line("x")], [line("e1", 2)]])
    src.hold.clear()
    stopping = asyncio.Event()
    task = asyncio.create_task(runner(src, pipe, stopping).run())
    async with asyncio.timeout(TIMEOUT):
        while ("t", "order", "x") not in sink.rows:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    assert sink.rows[("t", "order", "e1")] == 1 and src.committed == []
    src.hold.set()
    async with asyncio.timeout(TIMEOUT):
        while len(src.committed) < 3:
            await asyncio.sleep(0.01)
    assert sink.rows[("t", "order", "e1")] == 2 and await dlq_entries(pipe) == []
    stopping.set()
    await asyncio.wait_for(task, TIMEOUT)


class WatchedSink(MemorySink):
    """Notes, at each write, which batches (ListSource positions) it holds and which of the
    source's batches were committed then."""

    def __init__(self, name: str, src: ListSource) -> None:
        super().__init__(name)
        self.src = src
        self.writes: list[tuple[set[int], list[int]]] = []

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        self.writes.append(({r.raw.position for r in records}, list(self.src.committed)))
        await asyncio.sleep(0)
        return await super().write(records)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=3), min_size=1, max_size=12),
    st.lists(st.integers(0, 30), max_size=12),
    st.sampled_from([1, 2]),
)
def test_no_batch_is_written_beside_an_uncommitted_one_of_the_same_entity(
        entities: list[list[int]], turns: list[int], depth: int) -> None:
    """Mechanism (docs/architecture.md, "Pipelined batches"): with commits running behind
    at drawn speeds, and one or two sink writes at once, a batch is written only when no
    earlier batch sharing one of its entities is still uncommitted; commits stay in read
    order, and the sink ends with each entity's last revision and nothing dead-lettered."""
    batches = [[line(f"e{e}", i + 1) for e in sorted(set(ents))] for i, ents in enumerate(entities)]

    async def go() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            database = await SQLiteDB.open(Path(tmp) / "state.db")
            try:
                src = SlowCommits(batches, turns)
                sink = WatchedSink("a", src)
                pipe = make_pipeline(database, {"a": sink}, FakeSleep())
                pipe.write_depth = depth
                await run_until_committed(src, pipe, len(batches))
                assert src.committed == list(range(len(batches)))
                for held, committed in sink.writes:
                    for i in held:
                        for j in range(i):
                            if j not in committed:
                                assert not set(entities[i]) & set(entities[j]), (i, j, committed)
                last = {e: i + 1 for i, ents in enumerate(entities) for e in ents}
                assert sink.rows == {("t", "order", f"e{e}"): r for e, r in last.items()}
                assert await dlq_entries(pipe) == []
            finally:
                await database.close()

    asyncio.run(go())


class HeldSink(MemorySink):
    """Writes that wait for `release`; notes how many were under way at once."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.release = asyncio.Event()
        self.active = self.most = 0

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            await self.release.wait()
            return await super().write(records)
        finally:
            self.active -= 1


async def test_a_sink_that_takes_concurrent_writes_gets_the_next_disjoint_batch_at_once(
        db: SQLiteDB) -> None:
    """Why: one batch's COPY, its commit's fdatasync and the next batch's row building ran
    one after the other; a sink on a pool of connections (Postgres: write_depth 2) now has
    two disjoint batches under way at once (the old runner wrote one at a time)."""
    sink = HeldSink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    pipe.write_depth = 2
    src = ListSource([[line(f"e{i}")] for i in range(4)])
    stopping = asyncio.Event()
    task = asyncio.create_task(runner(src, pipe, stopping).run())
    async with asyncio.timeout(TIMEOUT):
        while sink.active < 2:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert sink.most == 2 and src.committed == []
    sink.release.set()
    async with asyncio.timeout(TIMEOUT):
        while len(src.committed) < 4:
            await asyncio.sleep(0.01)
    assert src.committed == [0, 1, 2, 3] and len(sink.rows) == 4
    stopping.set()
    await asyncio.wait_for(task, TIMEOUT)


async def test_at_depth_two_a_batch_sharing_an_entity_waits_for_the_write_in_flight(
        db: SQLiteDB) -> None:
    sink = HeldSink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    pipe.write_depth = 2
    src = ListSource([[line("e1", 1)], [line("e1", 2)]])
    stopping = asyncio.Event()
    task = asyncio.create_task(runner(src, pipe, stopping).run())
    await asyncio.sleep(0.3)
    assert sink.most == 1
    sink.release.set()
    async with asyncio.timeout(TIMEOUT):
        while len(src.committed) < 2:
            await asyncio.sleep(0.01)
    assert sink.most == 1 and sink.rows[("t", "order", "e1")] == 2
    assert await dlq_entries(pipe) == []
    stopping.set()
    await asyncio.wait_for(task, TIMEOUT)


async def test_at_depth_two_a_write_that_raises_is_isolated_alone(db: SQLiteDB) -> None:
    """A batch whose write raised is delivered again by isolation with no other batch of
    the source in the sink, then everything commits in order."""
    sink = CountingSink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    pipe.write_depth = 2
    real_write, real_brownout, beside = sink.write, pipe._brownout, []

    async def brownout(records: list[Record], *args: Any) -> list[Record]:
        if len(records) > 1 and any(r.entity_id == "bad" for r in records):
            await asyncio.sleep(0.1)  # raises while the next batch is in the sink
            raise ValueError("index out of range")
        return await real_brownout(records, *args)

    async def write(records: Sequence[Record]) -> list[SinkResult]:
        if any(r.raw.position == 1 for r in records):  # only isolation writes batch 1
            beside.append(sink.active)
        return await real_write(records)

    pipe._brownout = brownout  # type: ignore[method-assign]
    sink.write = write  # type: ignore[method-assign]
    src = ListSource([[line("a0"), line("a1")], [line("bad"), line("b1")],
                      [line("slow2"), line("c1")]])
    await run_until_committed(src, pipe, 3)
    rows = {("t", "order", e) for e in ("a0", "a1", "bad", "b1", "slow2", "c1")}
    assert set(sink.rows) == rows and src.committed == [0, 1, 2]
    assert beside and all(n == 0 for n in beside)
