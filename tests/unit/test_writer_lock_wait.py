"""The SQLite stores' writer-lock wait (`ingest.state.sqlite._flock`, `ingest_native.flock_wait`):
a blocking flock without the GIL that keeps the timeout, not a poll that took the GIL back
every 50 µs - 1 ms. Another holder is another open file description of the same lock file
(flock locks belong to those, so they conflict even within one process)."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.state import sqlite as S

native = pytest.importorskip("ingest_native")


@pytest.fixture
def lock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "x.db-lock"


def _fd(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def _held_by_someone(path: Path) -> bool:
    """Whether a third open file description cannot take the lock now."""
    fd = _fd(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _switches() -> int:
    """This thread's context switches so far (voluntary and not)."""
    tid = threading.get_native_id()
    total = 0
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.split(":")[0].endswith("ctxt_switches"):
                total += int(line.split(":")[1])
    return total


def _wait(fd: int, timeout: float) -> tuple[bool, float]:
    """`_flock(fd, timeout)` in a thread of its own, with a guard: a wait that never ends (a
    timeout lost) fails the test instead of hanging it."""
    out: list[tuple[bool, float]] = []

    def run() -> None:
        t0 = time.monotonic()
        out.append((S._flock(fd, timeout), time.monotonic() - t0))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout + 10)
    assert out, "the wait did not end at its timeout"
    return out[0]


def test_the_store_module_waits_in_the_compiled_helper() -> None:
    if os.environ.get("INGEST_NO_EXTENSION"):
        pytest.skip("the extension is turned off")
    assert S._FLOCK_WAIT is native.flock_wait


def test_a_lock_held_for_good_is_given_up_at_the_timeout(lock_path: Path) -> None:
    other, mine = _fd(lock_path), _fd(lock_path)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        got, took = _wait(mine, 0.3)
        assert not got
        assert 0.3 <= took < 2.0
        fcntl.flock(other, fcntl.LOCK_UN)
        assert not _held_by_someone(lock_path)  # the timed-out wait left nothing held
        got, took = _wait(mine, 0.3)
        assert got and took < 0.3
    finally:
        os.close(other)
        os.close(mine)


def test_a_wait_neither_polls_nor_leaves_a_signal_behind(lock_path: Path) -> None:
    """Half a second of waiting is a few context switches of the waiting thread (the poll was
    one a 50 µs - 1 ms: hundreds); the thread's signal mask is as it was, and no signal of the
    wait's timer comes after it (a later sleep is not cut short)."""
    other, mine = _fd(lock_path), _fd(lock_path)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        threading.Timer(0.5, fcntl.flock, (other, fcntl.LOCK_UN)).start()
        before = _switches()
        t0 = time.monotonic()
        assert S._flock(mine, 5.0)
        took = time.monotonic() - t0
        switched = _switches() - before
        assert 0.45 <= took < 3.0
        assert switched < 20, switched
        assert _held_by_someone(lock_path)
        fcntl.flock(mine, fcntl.LOCK_UN)
        # timed out waits, then a sleep past where their timers would have fired again
        fcntl.flock(other, fcntl.LOCK_EX)
        for _ in range(3):
            assert not S._flock(mine, 0.01)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask
        t0 = time.monotonic()
        time.sleep(0.05)
        assert time.monotonic() - t0 >= 0.05
    finally:
        os.close(other)
        os.close(mine)


def test_a_wait_hands_the_gil_over(lock_path: Path) -> None:
    """While one thread waits, another Python thread runs: the wait does not hold the GIL."""
    other, mine = _fd(lock_path), _fd(lock_path)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        ran = threading.Event()

        def release() -> None:
            ran.set()  # Python code, run while the main thread waits
            time.sleep(0.1)
            fcntl.flock(other, fcntl.LOCK_UN)

        threading.Thread(target=release).start()
        assert S._flock(mine, 5.0)
        assert ran.is_set()
    finally:
        os.close(other)
        os.close(mine)


def test_a_bad_descriptor_raises(lock_path: Path) -> None:
    fd = _fd(lock_path)
    os.close(fd)
    with pytest.raises(OSError):
        native.flock_wait(fd, 0.1)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    release=st.one_of(st.none(), st.floats(0.0, 0.15)),
    timeout=st.floats(0.0, 0.4),
)
def test_taken_iff_released_before_the_deadline(
    lock_path: Path, release: float | None, timeout: float
) -> None:
    """Taken (and then held) when the other holder lets go well before the timeout; given up,
    holding nothing, when it does not let go until well after; near the deadline either."""
    other, mine = _fd(lock_path), _fd(lock_path)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        if release is not None:
            threading.Timer(release, fcntl.flock, (other, fcntl.LOCK_UN)).start()
        got, took = _wait(mine, timeout)
        if release is not None and release + 0.15 < timeout:
            assert got
        elif release is None:
            assert not got
            assert took >= timeout
        if got:
            assert took < timeout + 1.0
            assert _held_by_someone(lock_path)
            fcntl.flock(mine, fcntl.LOCK_UN)
        else:
            assert took < timeout + 1.0
    finally:
        time.sleep(0.2 if release is not None else 0)  # the timer has let go
        os.close(other)
        os.close(mine)
