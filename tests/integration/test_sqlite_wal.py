"""WAL checkpoints of the SQLite files (`ingest.state.sqlite.checkpoint_if_due`): a commit
only asks the file's checkpoint thread (`_Checkpointer`), which copies pages back on a
connection of its own without the writer lock, so neither this writer nor another process's
waits for it; the WAL stays bounded (once it holds CHECKPOINT_LOCKED frames the committing
writer copies the rest under the writer lock); and a process killed at any instant, a
checkpoint running or not, loses no commit."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.state import sqlite as state_sqlite
from ingest.state.sqlite import MIGRATIONS, _connect, _wal_frames, autocommit, immediate
from tests.integration._kill import kill_writer

pytestmark = pytest.mark.integration

ROW = "x" * 6000  # two pages and more a row: every transaction appends a few frames


def _open(path: Path) -> sqlite3.Connection:
    return _connect(path, MIGRATIONS)


def _put(conn: sqlite3.Connection, key: str) -> None:
    with immediate(conn):
        conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?)", (key, ROW))


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sqlite-checkpoint")]


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


def test_checkpoints_run_off_the_writers_thread_without_the_writer_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below CHECKPOINT_LOCKED no commit runs a checkpoint in its own call (the old code did,
    once CHECKPOINT_PAGES frames waited); the file's checkpoint thread copies the frames back
    while another process holds the writer lock; closing the connection stops the thread."""
    monkeypatch.setattr(state_sqlite, "CHECKPOINT_PAGES", 20)
    monkeypatch.setattr(state_sqlite, "CHECKPOINT_LOCKED", 10**6)
    path = tmp_path / "state.db"
    conn = _open(path)
    probe = os.open(f"{path}-lock", os.O_RDWR)
    in_call: list[str] = []
    try:
        conn.set_trace_callback(lambda sql: in_call.extend([sql] if "wal_check" in sql else []))
        for i in range(60):
            _put(conn, f"k{i % 7}")
        assert in_call == []
        fcntl.flock(probe, fcntl.LOCK_EX)  # another process's writer, as long as it likes
        try:
            deadline = time.monotonic() + 10
            while (frames := _wal_frames(conn)) is not None and frames[1] < frames[0] - 20:
                assert time.monotonic() < deadline, f"nothing copied back: {frames}"
                time.sleep(0.01)
        finally:
            fcntl.flock(probe, fcntl.LOCK_UN)
        cp = getattr(conn, "checkpointer", None)
        assert cp is not None and cp.passes >= 1
        assert _threads() == [f"sqlite-checkpoint-{path.name}"]
    finally:
        conn.close()
        os.close(probe)
    assert _threads() == []


@settings(max_examples=20, deadline=None)
@given(plan=st.lists(st.tuples(st.integers(0, 2), st.booleans()), min_size=40, max_size=160))
def test_wal_stays_bounded_under_writers_of_several_connections(
    plan: list[tuple[int, bool]],
) -> None:
    """Property: whatever connection writes, by `immediate` or `autocommit`, and whatever
    the checkpoint threads are doing, the WAL never holds more than CHECKPOINT_LOCKED frames
    and one transaction's (SQLite's own autocheckpoint, the backstop, is far above: without
    the writer's copy at CHECKPOINT_LOCKED the WAL would grow to it); and what was asked of
    the threads is done once the writers stop."""
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
                most = max(most, frames[0])
            assert most < 60 + 10
            deadline = time.monotonic() + 10
            while (frames := _wal_frames(conns[0])) is not None and frames[0] - frames[1] >= 20:
                assert time.monotonic() < deadline, f"asked, not copied back: {frames}"
                time.sleep(0.01)
        finally:
            for conn in conns:
                conn.close()


_WRITER = """
import sys
from pathlib import Path
from ingest.state import sqlite as state_sqlite
state_sqlite.CHECKPOINT_PAGES = 8  # the checkpoint thread at work nearly all the time
state_sqlite.CHECKPOINT_LOCKED = 64
conn = state_sqlite._connect(Path(sys.argv[1]), state_sqlite.MIGRATIONS)
i = int(sys.argv[2])
while True:
    with state_sqlite.immediate(conn):
        conn.execute("INSERT INTO checkpoints VALUES (?, ?)", (f"k{i:08d}", "x" * 6000))
    print(i, flush=True)
    i += 1
"""


@settings(max_examples=6, deadline=None)
@given(delay=st.floats(0.0, 0.4))
def test_no_commit_is_lost_when_killed_with_checkpoints_running(delay: float) -> None:
    """Property: a process committing without pause, its checkpoint thread copying pages
    back nearly all the time, killed with SIGKILL at any instant: every commit that returned
    is in the file when it is opened again, in order, and the file is whole."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.db"
        written = -1
        for _ in range(2):
            # 30 commits in: its checkpoint thread is at work
            written = kill_writer(_WRITER, [str(path), str(written + 1)], 30, delay)
            with sqlite3.connect(path) as c:
                assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                keys = [k for (k,) in c.execute("SELECT key FROM checkpoints ORDER BY key")]
            assert keys[: written + 1] == [f"k{i:08d}" for i in range(written + 1)]
            assert len(keys) in (written + 1, written + 2)  # the commit in flight, or not
            written = len(keys) - 1
        assert written + 1 >= 60  # two processes, 30 commits and more each
