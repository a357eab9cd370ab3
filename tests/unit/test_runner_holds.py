"""The runner tells its source when it holds and when it stops (Source.pause/resume/stop).

A scripted source records the calls it gets; the pipeline is the real one on SQLite stores,
with an in-memory sink (the test double of tests/unit/test_worker.py).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ingest.pipeline import runner as R
from ingest.pipeline.decode import Decoder
from ingest.pipeline.runner import SourceRunner
from ingest.records import RawRecord
from ingest.sources.base import AdapterHealth, PullOnly, SourceBatch
from ingest.state.sqlite import SQLiteDB
from tests.conftest import until
from tests.unit.test_worker import FakeSleep, MemorySink, make_pipeline


def record(i: int) -> RawRecord:
    data = (
        b'{"schema_version":3,"tenant_id":"t","entity_type":"order","entity_id":"e%d",'
        b'"revision":1,"occurred_at":"2025-01-01T00:00:00Z","attributes":{}}' % i
    )
    return RawRecord(data=data, tenant="t", source="s", seq=i, position=i, event_time=0.0)


class ScriptedSource:
    """Yields the batches put in `feed`; waits (without fetching) while none is there."""

    name = kind = "scripted"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.feed: asyncio.Queue[list[RawRecord]] = asyncio.Queue()
        self.committed: list[int] = []
        self._stopped = asyncio.Event()
        self._health = AdapterHealth()

    async def start(self) -> None: ...

    async def batches(self) -> AsyncIterator[SourceBatch]:
        while not self._stopped.is_set():
            get = asyncio.ensure_future(self.feed.get())
            stop = asyncio.ensure_future(self._stopped.wait())
            await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not get.done():
                get.cancel()
                return
            recs = get.result()
            yield SourceBatch(recs, recs[-1].seq, recs[0].seq, recs[-1].seq)

    async def commit(self, batch: SourceBatch) -> None:
        self.committed.append(batch.position)

    async def pause(self) -> None:
        self.calls.append("pause")

    async def resume(self) -> None:
        self.calls.append("resume")

    async def stop(self) -> None:
        self.calls.append("stop")
        self._stopped.set()

    def health(self) -> AdapterHealth:
        return self._health

    async def close(self) -> None: ...


@pytest.fixture()
async def setup(tmp_path: Path) -> AsyncIterator[tuple[SourceRunner, ScriptedSource, MemorySink]]:
    db = await SQLiteDB.open(tmp_path / "state.db")
    sink = MemorySink("a")
    pipe = make_pipeline(db, {"a": sink}, FakeSleep())
    source = ScriptedSource()
    runner = SourceRunner(
        source,  # type: ignore[arg-type]
        pipe,
        Decoder(),
        pipe.admission,
        stopping=asyncio.Event(),
        on_pending=lambda n: None,
    )
    yield runner, source, sink
    await db.close()


async def test_drain_pauses_the_source_and_resume_resumes_it(
    setup: tuple[SourceRunner, ScriptedSource, MemorySink],
) -> None:
    runner, source, sink = setup
    task = asyncio.create_task(runner.run())
    source.feed.put_nowait([record(1)])
    await until(lambda: source.committed == [1])
    runner.admission.drain()
    source.feed.put_nowait([record(2)])  # read before the runner saw the drain, or held
    await until(lambda: "pause" in source.calls)
    await asyncio.sleep(0.3)
    assert source.calls == ["pause"]  # held once, not again and again
    runner.admission.resume()
    await until(lambda: source.committed == [1, 2] and "resume" in source.calls)
    assert source.calls == ["pause", "resume"]
    runner.stopping.set()
    await asyncio.wait_for(task, 5)
    assert source.calls == ["pause", "resume", "stop"]
    assert len(sink.rows) == 2


async def test_stop_ends_the_read_in_progress_without_cancelling_it(
    setup: tuple[SourceRunner, ScriptedSource, MemorySink], caplog: pytest.LogCaptureFixture
) -> None:
    runner, source, _ = setup
    task = asyncio.create_task(runner.run())
    await asyncio.sleep(0.1)  # the reader waits in batches() for data
    started = time.monotonic()
    runner.stopping.set()
    await asyncio.wait_for(task, 5)
    assert source.calls == ["stop"]
    assert time.monotonic() - started < R.STOP_GRACE_S  # batches() ended by itself
    # the read that ended (StopAsyncIteration) was awaited: every shutdown used to log
    # "Task exception was never retrieved" with a traceback once the task was collected
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text, caplog.text


async def test_a_reader_kept_waiting_downstream_pauses_its_source(
    setup: tuple[SourceRunner, ScriptedSource, MemorySink], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink that takes longer than HOLD_AFTER_S keeps the next batch waiting for room in
    the queue: the source is paused meanwhile (a Kafka member keeps its group)."""
    monkeypatch.setattr(R, "HOLD_AFTER_S", 0.2)
    runner, source, sink = setup
    gate = asyncio.Event()
    write = sink.write

    async def slow_write(records: object) -> object:
        await gate.wait()
        return await write(records)  # type: ignore[arg-type]

    sink.write = slow_write  # type: ignore[method-assign]
    task = asyncio.create_task(runner.run())
    for i in range(1, 4):  # 1 in the sink, 2 in the queue, 3 waiting for room
        source.feed.put_nowait([record(i)])
    await until(lambda: source.calls == ["pause"])
    gate.set()
    await until(lambda: source.committed == [1, 2, 3] and "resume" in source.calls)
    assert source.calls == ["pause", "resume"]
    runner.stopping.set()
    await asyncio.wait_for(task, 5)


async def test_a_pull_only_source_shows_the_hold_and_keeps_an_error_shown() -> None:
    class Held(PullOnly):
        def __init__(self, status: str) -> None:
            self._health = AdapterHealth(status=status)

    idle = Held("idle")
    await idle.pause()
    await idle.pause()
    assert idle._health.status == "paused"
    await idle.resume()
    assert idle._health.status == "idle"  # what it was, not a guess
    failing = Held("error")
    await failing.pause()
    assert failing._health.status == "error"  # a hold never hides an error
    await failing.resume()
    assert failing._health.status == "error"


async def test_a_pause_holds_a_source_whose_read_waits_for_data(
    setup: tuple[SourceRunner, ScriptedSource, MemorySink],
) -> None:
    """An operator's pause reaches a source while the runner's read waits in `batches()` for
    data (an idle bucket prefix, an empty topic): it is paused at once, not after the batch
    that read returns (an S3 source listed, leased and fetched on through the pause)."""
    runner, source, sink = setup
    task = asyncio.create_task(runner.run())
    await asyncio.sleep(0.1)  # the reader waits in batches() for data
    runner.admission.pause()
    await until(lambda: source.calls == ["pause"], timeout=2)
    source.feed.put_nowait([record(1)])  # arrives while paused: delivered after the resume
    await asyncio.sleep(0.3)
    assert sink.rows == {} and source.committed == []
    runner.admission.resume()
    await until(lambda: source.committed == [1])
    assert source.calls == ["pause", "resume"]
    runner.stopping.set()
    await asyncio.wait_for(task, 5)
    assert source.calls == ["pause", "resume", "stop"]


async def test_a_pause_and_its_resume_reach_the_source_at_once(
    setup: tuple[SourceRunner, ScriptedSource, MemorySink],
) -> None:
    """The runner follows the admission's pause and resume within a few turns of the loop,
    not at its next look (every 0.1 s: a bench_kafka run waited ~50 ms on average from its
    resume before its source fetched anything)."""
    runner, source, _sink = setup
    task = asyncio.create_task(runner.run())
    await asyncio.sleep(0.05)  # the reader waits in batches() for data

    async def took(calls: int) -> float:
        t = time.monotonic()
        while len(source.calls) < calls:
            await asyncio.sleep(0.001)
        return time.monotonic() - t

    for i in range(3):
        runner.admission.pause()
        paused_in = await asyncio.wait_for(took(2 * i + 1), 2)
        runner.admission.resume()
        resumed_in = await asyncio.wait_for(took(2 * i + 2), 2)
        assert max(paused_in, resumed_in) < 0.02, (i, paused_in, resumed_in)
    assert source.calls == ["pause", "resume"] * 3
    source.feed.put_nowait([record(1)])
    await until(lambda: source.committed == [1])
    runner.stopping.set()
    await asyncio.wait_for(task, 5)
