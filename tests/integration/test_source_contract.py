"""The contract every source keeps, one suite for all: after a crash it resumes from its
checkpoint with nothing skipped and nothing read twice past what was committed. Adding a
backend = one entry in SOURCES (how to feed it records, how to build it on its checkpoint
store). Here: the inbox (files), the webhook intake (SQLite), Kafka (the group's committed
offsets), S3 and SFTP (lease offsets and done versions), each on its real server.

What stays in the per-backend tests is what only that backend has: a worker SIGKILLed
holding a lease (S3), rebalances and seeks (Kafka), settling and moving files (SFTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiobotocore.session import get_session

from ingest.config import InboxSourceConfig, WebhookSourceConfig
from ingest.records import RawRecord
from ingest.sources.base import Source, SourceBatch
from ingest.sources.inbox import InboxSource
from ingest.sources.s3 import S3Source
from ingest.sources.sftp import SFTPSource
from ingest.state.leases import SQLiteLeaseStore
from ingest.state.sqlite import SQLiteCheckpointStore, SQLiteDB
from ingest.webhook.source import WebhookSource
from ingest.webhook.sqlite import SQLiteIntake
from tests.conftest import until
from tests.integration._fixtures_files import put, s3_config, sftp_config
from tests.integration._fixtures_kafka import produce, source_for

pytestmark = pytest.mark.integration

N, BATCH, KEEP = 23, 5, 2  # records fed, batch size, batches committed before the crash
PER_ITEM = 12  # S3 objects / SFTP files hold 12 lines: KEEP batches end mid-item


@dataclass
class Ctx:
    """What a backend may use to set itself up: scratch dir, the SQLite state the local
    backends keep checkpoints in, the test's fixtures (servers), cleanups."""

    tmp: Path
    db: SQLiteDB
    request: pytest.FixtureRequest
    stack: contextlib.AsyncExitStack

    def fixture(self, name: str) -> Any:
        return self.request.getfixturevalue(name)


@dataclass
class Backend:
    feed: Callable[[list[bytes]], Awaitable[None]]
    make: Callable[[], Source]
    # Reading has really begun (Kafka: the partitions are assigned), so that "nothing came
    # for `idle` seconds" means nothing is there, not that the source is still connecting.
    ready: Callable[[Source], bool] = lambda source: True
    # Records of one stream keep the order they were fed in: the whole source, or a
    # Kafka partition (Kafka orders nothing across partitions).
    stream: Callable[[RawRecord], object] = lambda record: None
    idle: float = 2.0


def line(i: int) -> bytes:
    return orjson.dumps({"tenant_id": "acme", "entity_id": f"e-{i}", "n": i})


def chunks(lines: list[bytes], size: int) -> list[bytes]:
    return [b"".join(x + b"\n" for x in lines[i : i + size]) for i in range(0, len(lines), size)]


async def _inbox(ctx: Ctx) -> Backend:
    cfg = InboxSourceConfig(path=ctx.tmp / "inbox", poll_seconds=0.01, batch_size=BATCH)

    async def feed(lines: list[bytes]) -> None:
        (ctx.tmp / "inbox" / "acme").mkdir(parents=True, exist_ok=True)
        (ctx.tmp / "inbox" / "acme" / "a.jsonl").write_bytes(chunks(lines, len(lines))[0])

    def make() -> Source:
        return InboxSource(cfg, SQLiteCheckpointStore(ctx.db, "w0"), settle_seconds=0)

    return Backend(feed, make)


async def _webhook(ctx: Ctx) -> Backend:
    cfg = WebhookSourceConfig(batch_size=BATCH)
    intake = SQLiteIntake(ctx.db)

    async def feed(lines: list[bytes]) -> None:
        for i in range(0, len(lines), 4):  # several bodies, as senders post them
            await intake.append("acme", "orders", lines[i : i + 4], time.time())

    def make() -> Source:
        return WebhookSource(cfg, intake, SQLiteCheckpointStore(ctx.db, "w0"), poll_seconds=0.01)

    return Backend(feed, make)


async def _kafka(ctx: Ctx) -> Backend:
    partitions = 3
    brokers: str = ctx.fixture("brokers")
    topic: str = ctx.fixture("make_topic")(partitions)
    group: str = ctx.fixture("group")

    async def feed(lines: list[bytes]) -> None:
        produce(brokers, topic, lines, key=lambda i: str(i).encode())

    def make() -> Source:
        return source_for(brokers, topic, group, batch_size=BATCH)

    def assigned(source: Any) -> bool:
        return len(source.health().extra.get("partitions", {})) == partitions

    return Backend(feed, make, ready=assigned, stream=lambda r: r.position[1], idle=3.0)


def _item_ready(source: Any) -> bool:
    """An object source has listed (and read, if there was anything)."""
    health = source.health()
    return health.records_read > 0 or health.status == "idle"


async def _s3(ctx: Ctx) -> Backend:
    endpoint: str = ctx.fixture("s3_endpoint")
    prefix: str = ctx.fixture("prefix")
    client = await ctx.stack.enter_async_context(
        get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1")
    )
    cfg = s3_config(endpoint, prefix, batch_size=BATCH, poll_seconds=0.05)
    workers = itertools.count(1)

    async def feed(lines: list[bytes]) -> None:
        for i, body in enumerate(chunks(lines, PER_ITEM)):
            await put(client, f"{prefix}{i:02d}.jsonl", body)

    def make() -> Source:  # each process a worker of its own: the lease store is shared
        leases = SQLiteLeaseStore(ctx.db)
        return S3Source(
            cfg, SQLiteCheckpointStore(ctx.db, "w0"), leases, worker_id=f"w{next(workers)}"
        )

    return Backend(feed, make, ready=_item_ready, idle=3.0)


async def _sftp(ctx: Ctx) -> Backend:
    server = ctx.fixture("sftp_server")
    directory: Path = ctx.fixture("sftp_dir")
    cfg = sftp_config(server, directory, batch_size=BATCH, poll_seconds=0.05)
    workers = itertools.count(1)

    async def feed(lines: list[bytes]) -> None:
        settled = time.time() - 60  # written long ago: no settling wait
        for i, body in enumerate(chunks(lines, PER_ITEM)):
            path = directory / f"{i:02d}.jsonl"
            path.write_bytes(body)
            os.utime(path, (settled + i, settled + i))

    def make() -> Source:
        leases = SQLiteLeaseStore(ctx.db)
        return SFTPSource(
            cfg, SQLiteCheckpointStore(ctx.db, "w0"), leases, worker_id=f"w{next(workers)}"
        )

    return Backend(feed, make, ready=_item_ready, idle=3.0)


SOURCES: dict[str, Callable[[Ctx], Awaitable[Backend]]] = {
    "inbox": _inbox,
    "webhook": _webhook,
    "kafka": _kafka,
    "s3": _s3,
    "sftp": _sftp,
}


async def read_until_idle(
    backend: Backend, source: Source, commit: Callable[[int], bool]
) -> list[SourceBatch]:
    """Read as the runner does (the iterator runs on in a task of its own, never cancelled
    mid-read); commit batch i only if commit(i). Ends once ready and nothing came for
    `backend.idle` seconds; then stop() ends the iterator."""
    queue: asyncio.Queue[SourceBatch] = asyncio.Queue()

    async def pull() -> None:
        async for batch in source.batches():
            await queue.put(batch)

    task = asyncio.create_task(pull())
    out: list[SourceBatch] = []
    try:
        await until(lambda: backend.ready(source) or task.done(), 60, "the source to be ready")
        while True:
            try:
                batch = await asyncio.wait_for(queue.get(), backend.idle)
            except TimeoutError:
                break
            if commit(len(out)):
                await source.commit(batch)
            out.append(batch)
        await source.stop()
        await asyncio.wait_for(task, 15)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    while not queue.empty():  # read after the last look: counts as read, never committed
        out.append(queue.get_nowait())
    return out


def data(batches: list[SourceBatch]) -> list[bytes]:
    return [r.data.strip() for b in batches for r in b.records]


def assert_in_feed_order(backend: Backend, batches: list[SourceBatch], fed: list[bytes]) -> None:
    """Within each stream, records come in the order they were fed."""
    index = {x: i for i, x in enumerate(fed)}
    streams: dict[object, list[int]] = {}
    for r in (r for b in batches for r in b.records):
        streams.setdefault(backend.stream(r), []).append(index[r.data.strip()])
    for stream, got in streams.items():
        assert got == sorted(got), f"stream {stream!r} out of order: {got}"


@pytest.mark.parametrize("name", sorted(SOURCES))
async def test_resumes_from_its_checkpoint_nothing_skipped_nothing_doubled(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:
        async with contextlib.AsyncExitStack() as stack:
            backend = await SOURCES[name](Ctx(tmp_path, db, request, stack))
            fed = [line(i) for i in range(N)]
            assert len(set(fed)) == N  # distinct: equal sorted lists mean each exactly once
            await backend.feed(fed)

            first: Any = backend.make()
            await first.start()
            read = await read_until_idle(backend, first, lambda i: i < KEEP)  # then "crash"
            await first.close()
            assert sorted(data(read)) == sorted(fed)  # it read everything, once
            assert_in_feed_order(backend, read, fed)
            committed = data(read[:KEEP])
            assert 0 < len(committed) < N

            again: Any = backend.make()  # a new process on the same checkpoint store
            await again.start()
            rest = await read_until_idle(backend, again, lambda i: True)
            await again.close()
            # no record skipped, none read twice, none committed read again
            assert sorted(committed + data(rest)) == sorted(fed)
            assert_in_feed_order(backend, read[:KEEP] + rest, fed)

            third: Any = backend.make()  # everything committed: nothing comes back
            await third.start()
            assert data(await read_until_idle(backend, third, lambda i: True)) == []
            await third.close()
    finally:
        await db.close()
