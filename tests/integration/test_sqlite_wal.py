"""WAL checkpoints of the SQLite files run after the writer lock is released
(`ingest.state.sqlite.checkpoint_if_due`): other processes' writers no longer wait for a
checkpoint's page copies and fsyncs, and the WAL stays bounded. A `SQLiteDB`'s run on a
thread of their own (`ingest.state.sqlite.Checkpointer`): its writes never run one on
their own thread, the writer lock is taken only for a short tail and never while the disk is
slow (below CHECKPOINT_FORCED)."""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.state import sqlite as state_sqlite
from ingest.state.sqlite import (
    MIGRATIONS,
    Checkpointer,
    SQLiteDB,
    _connect,
    _wal_frames,
    autocommit,
    immediate,
)

pytestmark = pytest.mark.integration

ROW = "x" * 6000  # two pages and more a row: every transaction appends a few frames


def _open(path: Path) -> sqlite3.Connection:
    return _connect(path, MIGRATIONS)


def _put(conn: sqlite3.Connection, key: str) -> None:
    with immediate(conn):
        conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?)", (key, ROW))


def _lock_probe(path: Path) -> tuple[int, list[bool], Callable[[str], None]]:
    """A second descriptor of the file's writer lock and a trace callback that notes, at
    each checkpoint statement, whether the lock was free."""
    probe = os.open(f"{path}-lock", os.O_RDWR)
    free: list[bool] = []

    def trace(sql: str) -> None:
        if "wal_checkpoint" in sql:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                free.append(False)
            else:
                fcntl.flock(probe, fcntl.LOCK_UN)
                free.append(True)

    return probe, free, trace


def _writes_during_passes(
    monkeypatch: pytest.MonkeyPatch,
    conn: sqlite3.Connection,
    writer: sqlite3.Connection,
    reader: sqlite3.Connection,
) -> None:
    """Other processes go on during the checkpointer's pass: a reader whose snapshot began
    before it (so the next write cannot restart the WAL), and a writer appending a row
    after it, before the checkpointer looks at the WAL again (a tail not copied yet)."""
    real = state_sqlite._wal_frames
    reading = [False]

    def frames(c: sqlite3.Connection) -> tuple[int, int] | None:
        if c is conn:
            if not reading[0]:  # the look before the passes
                reader.execute("BEGIN")
                reader.execute("SELECT count(*) FROM checkpoints").fetchone()
                reading[0] = True
            else:  # the look after a pass
                with state_sqlite.writer_lock(writer):
                    writer.execute("INSERT OR REPLACE INTO checkpoints VALUES ('tail', ?)", (ROW,))
                reader.execute("COMMIT")
                reading[0] = False
        return real(c)

    monkeypatch.setattr(state_sqlite, "_wal_frames", frames)


def test_the_wal_index_header_is_read_right(tmp_path: Path) -> None:
    """`_wal_frames` reads the frame counts SQLite itself reports."""
    conn = _open(tmp_path / "state.db")
    try:
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        for i in range(5):
            with state_sqlite.writer_lock(conn):
                conn.execute("INSERT INTO checkpoints VALUES (?, ?)", (f"k{i}", ROW))
        frames = _wal_frames(conn)
        busy, log, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and frames == (log, 0) and log >= 10
        assert _wal_frames(conn) == (log, done) == (log, log)
    finally:
        conn.close()


def test_checkpoints_run_outside_the_writer_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every checkpoint a commit starts finds the file's writer lock free (another
    process's writer may go on meanwhile), and the commits do start them."""
    monkeypatch.setattr(state_sqlite, "CHECKPOINT_PAGES", 20)
    path = tmp_path / "state.db"
    conn = _open(path)
    probe, free, trace = _lock_probe(path)
    try:
        conn.set_trace_callback(trace)
        for i in range(60):
            _put(conn, f"k{i % 7}")
        assert len(free) >= 3 and all(free)
    finally:
        conn.close()
        os.close(probe)


@settings(max_examples=20, deadline=None)
@given(plan=st.lists(st.tuples(st.integers(0, 2), st.booleans()), min_size=40, max_size=120))
def test_wal_stays_bounded_under_writers_of_several_connections(
    plan: list[tuple[int, bool]],
) -> None:
    """Property: whatever connection writes, by `immediate` or `autocommit`, the WAL never
    holds many more frames than CHECKPOINT_PAGES (SQLite's own autocheckpoint, the backstop,
    is far above: without `checkpoint_if_due` the WAL would grow to it)."""
    import tempfile

    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as tmp:
        mp.setattr(state_sqlite, "CHECKPOINT_PAGES", 20)
        mp.setattr(state_sqlite, "CHECKPOINT_LOCKED", 60)
        conns = [_open(Path(tmp) / "state.db") for _ in range(3)]
        try:
            most = 0
            for step, (who, by_autocommit) in enumerate(plan):
                conn = conns[who]
                if by_autocommit:
                    autocommit(
                        conn,
                        "INSERT OR REPLACE INTO checkpoints VALUES (?, ?)",
                        (f"k{step % 9}", ROW),
                    )
                else:
                    _put(conn, f"k{step % 9}")
                frames = _wal_frames(conn)
                assert frames is not None
                most = max(most, frames[0] - frames[1])
            assert most < 20 + 10
        finally:
            for conn in conns:
                conn.close()


def test_a_new_file_takes_the_page_size_asked_an_old_file_keeps_its_own(tmp_path: Path) -> None:
    """`page_size` shapes only a file not yet written (sink.db's 16 KiB); a file made with
    SQLite's 4 KiB keeps its pages and rows, and its checkpoint counts stay as they were."""
    new = _connect(tmp_path / "new.db", MIGRATIONS, 16384)
    try:
        assert new.execute("PRAGMA page_size").fetchone()[0] == 16384
        assert new.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert isinstance(new, state_sqlite.Connection) and new.frame_scale == 4
    finally:
        new.close()
    old = _open(tmp_path / "old.db")
    _put(old, "kept")
    old.close()
    again = _connect(tmp_path / "old.db", MIGRATIONS, 16384)
    try:
        assert again.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert isinstance(again, state_sqlite.Connection) and again.frame_scale == 1
        assert again.execute("SELECT value FROM checkpoints WHERE key = 'kept'").fetchone() == (
            ROW,
        )
    finally:
        again.close()


def test_larger_pages_checkpoint_at_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CHECKPOINT_PAGES counts 4 KiB frames: a file of 16 KiB pages checkpoints once a
    quarter as many frames wait, so its WAL holds no more bytes than a 4 KiB file's."""
    monkeypatch.setattr(state_sqlite, "CHECKPOINT_PAGES", 40)
    monkeypatch.setattr(state_sqlite, "CHECKPOINT_LOCKED", 120)
    conn = _connect(tmp_path / "state.db", MIGRATIONS, 16384)
    try:
        most = 0
        for i in range(80):
            _put(conn, f"k{i % 9}")
            frames = _wal_frames(conn)
            assert frames is not None
            most = max(most, frames[0] - frames[1])
        assert 0 < most < 40 // 4 + 4
    finally:
        conn.close()


# ------------------------------------------------ checkpoints on a thread of their own


def test_a_sqlitedb_writer_runs_no_checkpoint_and_its_checkpointer_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's connection never runs `wal_checkpoint` (its thread waits for no copy or
    fsync); the checkpointer's passes keep what waits to be copied bounded."""
    monkeypatch.setattr(state_sqlite, "CHECKPOINT_PAGES", 20)

    async def main() -> None:
        db = await SQLiteDB.open(tmp_path / "state.db")
        ran: list[str] = []
        try:

            def trace_and_write(c: sqlite3.Connection) -> None:
                c.set_trace_callback(
                    lambda sql: ran.append(sql) if "wal_checkpoint" in sql else None
                )
                for i in range(80):
                    _put(c, f"k{i % 7}")
                c.set_trace_callback(None)

            await db.run(trace_and_write)
            checkpointer = await db.run(lambda c: getattr(c, "checkpointer", None))
            # by name: a unit test that reloads ingest's modules leaves two such classes
            assert type(checkpointer).__name__ == "Checkpointer"
            deadline = time.monotonic() + 10
            while True:
                frames = await db.run(_wal_frames)
                assert frames is not None
                if frames[0] - frames[1] < 20 or time.monotonic() > deadline:
                    break
                await db.run(lambda c: _put(c, "again"))
                await asyncio.sleep(0.05)
            assert ran == []
            assert checkpointer.passes >= 1
            assert frames[0] - frames[1] < 20
        finally:
            await db.close()

    asyncio.run(main())


class _Setting(NamedTuple):
    """A file with a writer (inline checkpoints off: the checkpointer's to run), the
    checkpointer's connection traced by `_lock_probe`, a reader, and a Checkpointer."""

    writer: sqlite3.Connection
    conn: sqlite3.Connection
    reader: sqlite3.Connection
    free: list[bool]
    cp: Checkpointer


@pytest.fixture
def setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Setting]:
    monkeypatch.setattr(state_sqlite, "CHECKPOINT_PAGES", 20)
    monkeypatch.setattr(state_sqlite, "CHECKPOINT_LOCKED", 60)
    monkeypatch.setattr(state_sqlite, "TAIL", 4)
    path = tmp_path / "state.db"
    writer = _connect(path, MIGRATIONS)
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    conn = state_sqlite._checkpointer_connect(path)
    reader = sqlite3.connect(path, isolation_level=None)
    probe, free, trace = _lock_probe(path)
    conn.set_trace_callback(trace)
    try:
        yield _Setting(writer, conn, reader, free, Checkpointer(path))
    finally:
        conn.close()
        reader.close()
        writer.close()
        os.close(probe)


def _append(writer: sqlite3.Connection, key: str) -> None:
    with state_sqlite.writer_lock(writer):
        writer.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?)", (key, ROW))


def test_unlocked_passes_leave_the_lock_free_and_the_tail_takes_it_when_quick(
    setting: _Setting, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past CHECKPOINT_LOCKED frames the checkpointer copies without the writer lock, then
    the tail with it (the disk answered quickly): the next write restarts the WAL."""
    writer, conn, reader, free, cp = setting
    for i in range(40):
        _append(writer, f"k{i}")
    frames = _wal_frames(conn)
    assert frames is not None and frames[0] >= 60 and frames[1] == 0
    _writes_during_passes(monkeypatch, conn, writer, reader)
    cp.checkpoint(conn)
    assert cp.locked == 1 and cp.passes >= 1 and cp.deferred == 0
    # every unlocked pass found the lock free, the last one (the tail) held it
    assert free[:-1] == [True] * cp.passes and free[-1] is False
    frames = _wal_frames(conn)
    assert frames is not None and frames[0] == frames[1]
    _put(writer, "next")  # the WAL restarts from its start
    frames = _wal_frames(conn)
    assert frames is not None and frames[0] < 10


def test_a_slow_disk_defers_the_locked_tail_until_the_wal_is_forced(
    setting: _Setting, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While passes are slow (SLOW = 0: every pass counts as slow) the checkpointer never
    takes the writer lock below CHECKPOINT_FORCED frames; past it, it does."""
    monkeypatch.setattr(state_sqlite, "CHECKPOINT_FORCED", 200)
    monkeypatch.setattr(state_sqlite, "SLOW", 0.0)
    writer, conn, reader, free, cp = setting
    _writes_during_passes(monkeypatch, conn, writer, reader)
    most = 0
    for i in range(200):
        _append(writer, f"k{i}")
        frames = _wal_frames(conn)
        assert frames is not None
        if frames[0] >= 200:
            break
        most = max(most, frames[0])
        if frames[0] - frames[1] >= 20:
            cp.checkpoint(conn)
    assert most >= 60 and cp.deferred >= 1 and cp.locked == 0 and all(free)
    cp.checkpoint(conn)
    assert cp.locked == 1 and free[-1] is False


@settings(max_examples=10, deadline=None)
@given(plan=st.lists(st.integers(0, 1), min_size=30, max_size=90))
def test_two_sqlitedbs_wal_stays_bounded_and_rows_are_whole(plan: list[int]) -> None:
    """Property: two `SQLiteDB`s on one file (a pod's two workers), writing in any order,
    each with its checkpointer: every row written is read back, and once the checkpointers
    caught up the WAL holds fewer frames than CHECKPOINT_LOCKED + a few writes' after the
    next write."""
    import tempfile

    async def main(tmp: str) -> None:
        dbs = [await SQLiteDB.open(Path(tmp) / "state.db") for _ in range(2)]
        try:
            for step, who in enumerate(plan):
                await dbs[who].run(functools.partial(_put, key=f"k{step}"))
            deadline = time.monotonic() + 10
            frames: tuple[int, int] | None = None
            while time.monotonic() < deadline:
                frames = await dbs[0].run(_wal_frames)
                assert frames is not None
                if frames[0] - frames[1] < 20:
                    break
                await asyncio.sleep(0.02)
            assert frames is not None and frames[0] - frames[1] < 20
            await dbs[1].run(lambda c: _put(c, "k0"))  # restarts the WAL if all was copied
            frames = await dbs[0].run(_wal_frames)
            assert frames is not None and frames[0] < 60 + 20
            (n,) = await dbs[1].run(
                lambda c: c.execute("SELECT count(*) FROM checkpoints").fetchone()
            )
            assert n == len(plan)
        finally:
            for db in dbs:
                await db.close()

    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as tmp:
        mp.setattr(state_sqlite, "CHECKPOINT_PAGES", 20)
        mp.setattr(state_sqlite, "CHECKPOINT_LOCKED", 60)
        asyncio.run(main(tmp))
