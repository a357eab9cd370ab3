"""The contract every source keeps, one suite for all: after a crash it resumes from its
checkpoint with nothing skipped and nothing read twice past what was committed. Adding a
backend = one entry in SOURCES (how to feed it records, how to build it on a checkpoint
store). Here: the inbox (files) and the webhook intake (SQLite); Kafka, S3 and SFTP keep
their own resume tests (test_kafka_source.py, test_s3_source.py, test_sftp_source.py) and are
not in the list yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingest.config import InboxSourceConfig, WebhookSourceConfig
from ingest.sources.base import Source, SourceBatch
from ingest.sources.inbox import InboxSource
from ingest.state.sqlite import SQLiteCheckpointStore, SQLiteDB
from ingest.webhook.source import WebhookSource
from ingest.webhook.sqlite import SQLiteIntake

pytestmark = pytest.mark.integration

N, BATCH, KEEP = 23, 5, 2  # records fed, batch size, batches committed before the crash


@dataclass
class Backend:
    feed: Callable[[list[bytes]], Awaitable[None]]
    make: Callable[[], Source]


def line(i: int) -> bytes:
    return orjson.dumps({"tenant_id": "acme", "entity_id": f"e-{i}", "n": i})


async def _inbox(tmp: Path, db: SQLiteDB) -> Backend:
    cfg = InboxSourceConfig(path=tmp / "inbox", poll_seconds=0.01, batch_size=BATCH)

    async def feed(lines: list[bytes]) -> None:
        (tmp / "inbox" / "acme").mkdir(parents=True, exist_ok=True)
        (tmp / "inbox" / "acme" / "a.jsonl").write_bytes(b"".join(x + b"\n" for x in lines))

    def make() -> Source:
        return InboxSource(cfg, SQLiteCheckpointStore(db, "w0"), settle_seconds=0)

    return Backend(feed, make)


async def _webhook(tmp: Path, db: SQLiteDB) -> Backend:
    cfg = WebhookSourceConfig(batch_size=BATCH)
    intake = SQLiteIntake(db)

    async def feed(lines: list[bytes]) -> None:
        for i in range(0, len(lines), 4):  # several bodies, as senders post them
            await intake.append("acme", "orders", lines[i : i + 4], time.time())

    def make() -> Source:
        return WebhookSource(cfg, intake, SQLiteCheckpointStore(db, "w0"), poll_seconds=0.01)

    return Backend(feed, make)


SOURCES: dict[str, Callable[[Path, SQLiteDB], Awaitable[Backend]]] = {
    "inbox": _inbox,
    "webhook": _webhook,
}


async def read_until_idle(source: Source, commit: Callable[[int], bool]) -> list[SourceBatch]:
    """Read as the runner does; commit batch i only if commit(i). Ends when nothing comes."""
    out: list[SourceBatch] = []
    it = source.batches()
    with contextlib.suppress(TimeoutError, StopAsyncIteration):
        while True:
            batch = await asyncio.wait_for(anext(it), 2.0)
            if commit(len(out)):
                await source.commit(batch)
            out.append(batch)
    await source.stop()
    with contextlib.suppress(Exception):
        await it.aclose()  # type: ignore[attr-defined]
    return out


def data(batches: list[SourceBatch]) -> list[bytes]:
    return [r.data.strip() for b in batches for r in b.records]


@pytest.mark.parametrize("name", sorted(SOURCES))
async def test_resumes_from_its_checkpoint_nothing_skipped_nothing_doubled(
    name: str, tmp_path: Path
) -> None:
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:
        backend = await SOURCES[name](tmp_path, db)
        fed = [line(i) for i in range(N)]
        await backend.feed(fed)

        first: Any = backend.make()
        await first.start()
        read = await read_until_idle(first, lambda i: i < KEEP)  # then "crash": no more commits
        await first.close()
        assert data(read) == fed  # it read everything, in order, once
        committed = data(read[:KEEP])
        assert 0 < len(committed) < N

        again: Any = backend.make()  # a new process on the same checkpoint store
        await again.start()
        rest = await read_until_idle(again, lambda i: True)
        await again.close()
        assert committed + data(rest) == fed  # no record skipped, none read twice

        third: Any = backend.make()  # everything committed: nothing comes back
        await third.start()
        assert data(await read_until_idle(third, lambda i: True)) == []
        await third.close()
    finally:
        await db.close()
