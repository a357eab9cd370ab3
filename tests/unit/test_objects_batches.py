"""Batches that run across objects (`ingest.sources.objects`): every line once, in order, and an
item marked done only once the commit of the batch holding its last line has returned.

The items come from a source of in-memory objects (the listing and the bytes are the only
part a subclass provides); leases and checkpoints are the real SQLite stores.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.config import S3SourceConfig
from ingest.records import RawRecord
from ingest.sources.base import SourceBatch
from ingest.sources.objects import ItemRef, ItemSource, SourceFailure, _Buffer, _ItemState
from ingest.state.leases import SQLiteLeaseStore
from ingest.state.sqlite import SQLiteCheckpointStore, SQLiteDB


class MemorySource(ItemSource[S3SourceConfig]):
    """Objects held in a dict, streamed in chunks of `chunk` bytes."""

    kind = "memory"

    def setup(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.chunk = 7

    async def list_items(self) -> list[ItemRef]:
        return [
            ItemRef(name, "v1", len(body), float(i))
            for i, (name, body) in enumerate(self.objects.items())
        ]

    async def open_item(self, ref: ItemRef, start: int) -> AsyncGenerator[bytes, None]:
        body = self.objects[ref.name][start:]
        for at in range(0, len(body), self.chunk):
            await asyncio.sleep(0)
            yield body[at : at + self.chunk]

    def describe(self, exc: Exception) -> SourceFailure:
        return SourceFailure(f"{type(exc).__name__}: {exc}", 0.01)


def _lines(item: int, n: int) -> bytes:
    return b"".join(orjson.dumps({"id": f"{item}-{i}"}) + b"\n" for i in range(n))


async def _scenario(tmp: Path, sizes: list[int], batch_size: int, chunk: int, lag: int) -> None:
    db = await SQLiteDB.open(tmp / "state.db")
    try:
        leases = SQLiteLeaseStore(db)
        cfg = S3SourceConfig(
            url="s3://b/p/", tenant="acme-corp", batch_size=batch_size, poll_seconds=0.01
        )
        source = MemorySource(cfg, SQLiteCheckpointStore(db, "w0"), leases, worker_id="w1")
        source.chunk = chunk
        source.objects = {f"o{i:03d}.jsonl": _lines(i, n) for i, n in enumerate(sizes)}
        expected = [f"{i}-{j}" for i, n in enumerate(sizes) for j in range(n)]
        await source.start()
        seen: list[str] = []
        committed_ids: set[str] = set()
        queue: asyncio.Queue[SourceBatch] = asyncio.Queue()

        async def pump() -> None:
            async for batch in source.batches():
                await queue.put(batch)

        reader = asyncio.create_task(pump())

        async def commit_oldest() -> None:
            batch = pending.pop(0)
            await source.commit(batch)
            committed_ids.update(orjson.loads(r.data)["id"] for r in batch.records)
            # every item done in the lease store has all its lines committed
            done = await leases.done_versions(cfg.name)
            for name in done:
                i = int(name[1:4])
                assert {f"{i}-{j}" for j in range(sizes[i])} <= committed_ids, name

        pending: list[SourceBatch] = []
        while len(seen) < len(expected):
            batch = await asyncio.wait_for(queue.get(), 10)
            assert 0 < len(batch.records) <= batch_size
            items = batch.position["items"]
            assert [i[2] for i in items][-1] == batch.position["offset"]
            seen += [orjson.loads(r.data)["id"] for r in batch.records]
            pending.append(batch)
            while len(pending) > lag:
                await commit_oldest()
        while pending:
            await commit_oldest()
        assert seen == expected  # every line once, in order
        for _ in range(500):  # empty items are finished by the reader, on its own
            if set(await leases.done_versions(cfg.name)) == set(source.objects):
                break
            await asyncio.sleep(0.01)
        assert set(await leases.done_versions(cfg.name)) == set(source.objects)
        assert queue.empty()  # nothing read twice
        await source.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    finally:
        await db.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=8),
    batch_size=st.integers(1, 12),
    chunk=st.integers(1, 40),
    lag=st.integers(0, 3),
)
def test_batches_run_across_items_and_items_finish_after_their_last_commit(
    sizes: list[int], batch_size: int, chunk: int, lag: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_scenario(Path(tmp), sizes, batch_size, chunk, lag))


def _raw(item: str, i: int) -> RawRecord:
    pos = {"key": item, "etag": "v", "offset": i + 1}
    return RawRecord(b"x", "t", "s", i, pos, 0.0, None, {})


@given(
    runs=st.lists(st.integers(1, 6), min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 8), max_size=10),
)
def test_buffer_takes_say_each_items_last_record(runs: list[int], cuts: list[int]) -> None:
    buf = _Buffer()
    states = [_ItemState(ItemRef(f"i{k}", "v", 0, 0.0)) for k in range(len(runs))]
    for state, n in zip(states, runs, strict=True):
        buf.add(state, [_raw(state.ref.name, i) for i in range(n)])
    assert [s.buffered for s in states] == runs
    taken: list[RawRecord] = []
    for cut in cuts:
        if not buf.records:
            break
        records, spans = buf.take(min(cut, len(buf.records)))
        # one span per item present, in order, naming that item's last record in the batch
        names = list(dict.fromkeys(r.position["key"] for r in records))
        assert [s.ref.name for s, _ in spans] == names
        for state, last in spans:
            assert last is [r for r in records if r.position["key"] == state.ref.name][-1]
        taken += records
    left = len(buf.records)
    assert sum(s.buffered for s in states) == left
    assert len(taken) + left == sum(runs)
    buf.forget()
    assert all(s.buffered == 0 for s in states) and not buf.records


class CountingSource(MemorySource):
    """MemorySource counting its listings and the items it opened (leased, then read)."""

    def setup(self) -> None:
        super().setup()
        self.listings = 0
        self.opened: list[str] = []

    async def list_items(self) -> list[ItemRef]:
        self.listings += 1
        return await super().list_items()

    async def open_item(self, ref: ItemRef, start: int) -> AsyncGenerator[bytes, None]:
        self.opened.append(ref.name)
        async for chunk in super().open_item(ref, start):
            yield chunk


async def test_a_held_source_lists_and_leases_nothing_until_resumed(tmp_path: Path) -> None:
    """`pause()` holds a read waiting in `batches()` (the runner pauses a source at once on an
    operator's pause): no listing, no lease, no GET until `resume()`; and mid-pass, after a
    batch, no further item is leased (the items leased ahead before the pause finish
    opening), nothing more is yielded; after `resume()` every line comes, once, in order."""
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:
        leases = SQLiteLeaseStore(db)
        cfg = S3SourceConfig(url="s3://b/p/", tenant="acme-corp", batch_size=10, poll_seconds=0.01)
        source = CountingSource(cfg, SQLiteCheckpointStore(db, "w0"), leases, worker_id="w1")
        source.chunk = 1 << 16
        await source.start()
        batches = source.batches()
        await source.pause()
        reading = asyncio.ensure_future(anext(batches))
        await asyncio.sleep(0.05)
        source.objects = {f"o{i:03d}.jsonl": _lines(i, 10) for i in range(8)}
        await asyncio.sleep(0.2)  # 20 polls of an unheld source
        assert (source.listings, source.opened, reading.done()) == (0, [], False)
        await source.resume()
        first = await asyncio.wait_for(reading, 5)
        assert [orjson.loads(r.data)["id"] for r in first.records] == [f"0-{j}" for j in range(10)]
        await source.pause()  # mid-pass: o001.. were being opened ahead
        reading = asyncio.ensure_future(anext(batches))
        await asyncio.sleep(0.2)
        opened = list(source.opened)
        assert not reading.done() and len(opened) <= 1 + 3  # o000 and the OPEN_AHEAD before
        await asyncio.sleep(0.1)
        assert source.opened == opened and source.listings == 1
        await source.resume()
        seen = [first, await asyncio.wait_for(reading, 5)]
        while sum(len(b.records) for b in seen) < 80:
            seen.append(await asyncio.wait_for(anext(batches), 5))
        ids = [orjson.loads(r.data)["id"] for b in seen for r in b.records]
        assert ids == [f"{i}-{j}" for i in range(8) for j in range(10)]
        await source.stop()
        await batches.aclose()
        await source.close()
    finally:
        await db.close()


async def test_a_resume_lists_at_once_not_after_the_poll(tmp_path: Path) -> None:
    """Paused and resumed while it waits out `poll_seconds` after an idle pass, the source
    lists again at once: a warm pod starts on an operator's resume, not up to a poll later.
    A resume before its wait began leaves the wait whole (no extra listing)."""
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:
        leases = SQLiteLeaseStore(db)
        cfg = S3SourceConfig(url="s3://b/p/", tenant="acme-corp", batch_size=10, poll_seconds=30)
        source = CountingSource(cfg, SQLiteCheckpointStore(db, "w0"), leases, worker_id="w1")
        await source.start()
        await source.resume()  # before any wait: must not cut the first one short
        batches = source.batches()
        reading = asyncio.ensure_future(anext(batches))
        await asyncio.sleep(0.1)
        assert source.listings == 1 and not reading.done()  # the empty pass, then the wait
        await source.pause()
        source.objects = {"o000.jsonl": _lines(0, 10)}
        await asyncio.sleep(0.1)
        assert source.listings == 1
        await source.resume()
        batch = await asyncio.wait_for(reading, 2)  # not 30 s
        assert source.listings == 2
        assert [orjson.loads(r.data)["id"] for r in batch.records] == [f"0-{j}" for j in range(10)]
        await source.stop()
        await batches.aclose()
        await source.close()
    finally:
        await db.close()
