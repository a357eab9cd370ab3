"""An idle inbox worker is woken by a file landing (inotify), not only by its poll.

Real files in a temp directory and the real SQLite checkpoint store. The poll is set to 30 s,
so a file read within a few seconds was read because the kernel said it landed: renamed in,
copied in and closed, or in a tenant directory made after the worker went idle. Without
inotify (`DirWatch.open` None: other OSes, no instances left) the poll still reads it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.config import InboxSourceConfig
from ingest.sources import dirwatch
from ingest.sources.inbox import InboxSource
from ingest.state.sqlite import SQLiteCheckpointStore, SQLiteDB

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux's")

LINES = b'{"tenant_id": "acme", "entity_id": "e-1"}\n{"tenant_id": "acme", "entity_id": "e-2"}\n'
WAKE_S = 5.0  # far under the 30-s poll: only a wake-up reads the file in time


async def read_one(root: Path, land: str, poll: float = 30.0) -> float:
    """Seconds from a file landing (how: `land`) in an idle source until its batch is read."""
    db = await SQLiteDB.open(root / "state.db")
    cfg = InboxSourceConfig(path=root / "inbox", poll_seconds=poll, batch_size=10)
    source = InboxSource(cfg, SQLiteCheckpointStore(db, "test"), settle_seconds=30)
    tenant = root / "inbox" / "acme"
    if land != "new tenant":
        tenant.mkdir(parents=True)
    await source.start()
    batches = source.batches()
    first = asyncio.ensure_future(anext(batches))
    try:
        for _ in range(100):  # until it scanned the empty inbox and went idle
            await asyncio.sleep(0.01)
            if source.health().status == "idle":
                break
        await asyncio.sleep(0.05)
        t0 = asyncio.get_running_loop().time()
        if land == "copied":  # written in place and closed: no rename
            (tenant / "f.jsonl").write_bytes(LINES)
        else:
            (root / "f.tmp").write_bytes(LINES)
            tenant.mkdir(parents=True, exist_ok=True)
            os.rename(root / "f.tmp", tenant / "f.jsonl")
        batch = await asyncio.wait_for(first, 60)
        took = asyncio.get_running_loop().time() - t0
        assert [r.data for r in batch.records] == LINES.splitlines()
        return took
    finally:
        first.cancel()
        await source.stop()
        await asyncio.gather(first, return_exceptions=True)
        await batches.aclose()
        await source.close()
        await db.close()


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(land=st.sampled_from(["renamed", "copied", "new tenant"]))
def test_a_landing_file_wakes_the_idle_worker(land: str) -> None:
    with tempfile.TemporaryDirectory(prefix="inbox-wake-") as tmp:
        took = asyncio.run(read_one(Path(tmp), land))
    assert took < WAKE_S, f"{land}: read after {took:.2f} s, not woken"


def test_without_inotify_the_poll_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirwatch.DirWatch, "open", classmethod(lambda cls: None))
    with tempfile.TemporaryDirectory(prefix="inbox-wake-") as tmp:
        took = asyncio.run(read_one(Path(tmp), "renamed", poll=0.2))
    assert took < WAKE_S


def test_the_watch_closes_its_descriptor() -> None:
    async def run() -> tuple[int, int]:
        watch = dirwatch.DirWatch.open()
        assert watch is not None
        fd = watch.fd
        watch.close()
        return fd, watch.fd

    fd, after = asyncio.run(run())
    assert after == -1
    with pytest.raises(OSError):
        os.fstat(fd)
