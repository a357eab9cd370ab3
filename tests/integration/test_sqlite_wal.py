"""WAL checkpoints of the SQLite files run after the writer lock is released
(`ingest.state.sqlite.checkpoint_if_due`): other processes' writers no longer wait for a
checkpoint's page copies and fsyncs, and the WAL stays bounded."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.state import sqlite as state_sqlite
from ingest.state.sqlite import MIGRATIONS, _connect, _wal_frames, autocommit, immediate

pytestmark = pytest.mark.integration

ROW = "x" * 6000  # two pages and more a row: every transaction appends a few frames


def _open(path: Path) -> sqlite3.Connection:
    return _connect(path, MIGRATIONS)


def _put(conn: sqlite3.Connection, key: str) -> None:
    with immediate(conn):
        conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?)", (key, ROW))


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
