"""Disk: watermarks with hysteresis, and a full disk as a condition waited out, not a failure.

The filesystem itself is faked here only through `statvfs` (a clock-like input); the real
small-filesystem test is tests/e2e/test_disk_full.py.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from ingest.config import DiskConfig
from ingest.disk import DiskGuard
from ingest.errors import SinkError, StoreUnavailable, is_disk_full
from ingest.metrics import Metrics
from ingest.pipeline.decode import Decoder
from ingest.records import RawRecord, ReasonCode, Record, SinkResult
from ingest.state.base import DLQFilter
from ingest.state.sqlite import SQLiteDB
from tests.unit.test_runner import line
from tests.unit.test_worker import FakeSleep, MemorySink, make_pipeline

MB = 1024 * 1024


class FakeFs:
    def __init__(self, free: int, total: int = 100 * MB) -> None:
        self.free, self.total = free, total

    def __call__(self, path: Path) -> os.statvfs_result:
        return os.statvfs_result((4096, 1, self.total, self.free, self.free, 0, 0, 0, 0, 255))


def test_intake_is_refused_below_low_and_accepted_again_above_high() -> None:
    fs = FakeFs(free=50 * MB)
    metrics = Metrics()
    guard = DiskGuard(Path("."), DiskConfig(low_watermark_bytes=10 * MB,
                                            high_watermark_bytes=20 * MB), metrics, statvfs=fs)
    assert guard.refuse_intake(1 * MB) is None
    assert guard.refuse_intake(45 * MB) is not None  # would eat into the reserve
    fs.free = 9 * MB
    reason = guard.refuse_intake(100)
    assert reason is not None and "below the 10.0 MiB" in reason
    fs.free = 15 * MB  # above low, below high: still refusing (no flapping)
    assert guard.refuse_intake(100) is not None
    fs.free = 21 * MB
    assert guard.refuse_intake(100) is None
    assert metrics.registry.get_sample_value("ingest_disk_free_bytes") == 21 * MB
    assert metrics.registry.get_sample_value("ingest_disk_low_watermark_bytes") == 10 * MB


def test_an_intake_on_another_disk_is_not_refused() -> None:
    guard = DiskGuard(Path("."), DiskConfig(low_watermark_bytes=10 * MB), statvfs=FakeFs(0),
                      guards_intake=False)
    assert guard.refuse_intake(100) is None
    guard.sample()
    assert guard.snapshot()["free_bytes"] == 0 and not guard.snapshot()["intake_refused"]


@pytest.mark.parametrize("exc", [
    sqlite3.OperationalError("database or disk is full"),
    OSError(errno.ENOSPC, "No space left on device"),
    StoreUnavailable("dlq", "x", "database or disk is full"),
])
def test_disk_full_is_recognised_through_wrapping(exc: BaseException) -> None:
    try:
        try:
            raise exc
        except BaseException as inner:
            raise SinkError(ReasonCode.CONNECTION_ERROR, "wrapped") from inner
    except SinkError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(SinkError(ReasonCode.CONNECTION_ERROR, "refused"))


class FullDiskSink(MemorySink):
    """Fails like the SQLite sink does on a full disk, `full_for` times."""

    def __init__(self, name: str, full_for: int) -> None:
        super().__init__(name)
        self.full_for = full_for

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        if self.full_for:
            self.full_for -= 1
            self.calls += 1
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.Error as exc:
                raise SinkError(ReasonCode.CONNECTION_ERROR, str(exc)) from exc
        return await super().write(records)


@pytest.fixture()
async def db(tmp_path: Path) -> AsyncIterator[SQLiteDB]:
    database = await SQLiteDB.open(tmp_path / "state.db")
    yield database
    await database.close()


async def test_a_full_disk_at_a_sink_is_waited_out_not_dead_lettered(db: SQLiteDB) -> None:
    """Bug: "database or disk is full" was CONNECTION_ERROR: it opened the breaker and valid,
    acknowledged records went to the DLQ as CIRCUIT_OPEN."""
    sink = FullDiskSink("a", full_for=20)  # more than retry attempts and breaker threshold
    sleep = FakeSleep()
    pipe = make_pipeline(db, {"a": sink}, sleep, threshold=3)
    seen_full: list[float] = []

    async def watch(seconds: float) -> None:
        seen_full.append(pipe.metrics.registry.get_sample_value("ingest_disk_full") or 0)
        await sleep(seconds)

    pipe.sleep = watch  # type: ignore[method-assign]
    raws = [RawRecord(line(f"e{i}"), "t", "s", i, i, 0.0) for i in range(3)]
    report = await pipe.deliver(raws, Decoder().decode_many(raws))
    assert report.delivered == 3 and report.dlq == 0
    assert [e async for page in pipe.dlq.scan(DLQFilter()) for e in page] == []
    assert pipe.lanes["a"].breaker.state.value == "closed"
    assert set(seen_full) == {1.0}  # shown while waiting
    assert pipe.metrics.registry.get_sample_value("ingest_disk_full") == 0
    assert pipe.disk_full_since is None and "disk is full" in (pipe.disk_full_error or "")


def test_a_pods_door_judges_a_sample_younger_than_max_age_without_a_statvfs() -> None:
    """The pod's door asks twice a request (`DISK_SAMPLE_SECONDS`): a sample younger than
    `max_age` is judged again, each body by its own size; an older one, or one from the
    future (the wall clock stepped back), is read again."""
    fs = FakeFs(free=50 * MB)
    calls = 0

    def statvfs(path: Path) -> os.statvfs_result:
        nonlocal calls
        calls += 1
        return fs(path)

    now = [1000.0]
    guard = DiskGuard(Path("."), DiskConfig(low_watermark_bytes=10 * MB), statvfs=statvfs,
                      clock=lambda: now[0])  # fmt: skip
    assert guard.refuse_intake(1 * MB, 0.05) is None and calls == 1
    fs.free = 5 * MB
    now[0] += 0.04
    assert guard.refuse_intake(1 * MB, 0.05) is None and calls == 1  # the sample is 40 ms old
    assert guard.refuse_intake(45 * MB, 0.05) is not None and calls == 1  # judged by its size
    now[0] += 0.02
    assert guard.refuse_intake(1 * MB, 0.05) is not None and calls == 2  # 60 ms: read again
    fs.free = 50 * MB
    now[0] -= 10.0  # the clock stepped back: the sample is from the future
    assert guard.refuse_intake(1 * MB, 0.05) is None and calls == 3
    assert guard.refuse_intake(1 * MB) is None and calls == 4  # no max_age: always read
