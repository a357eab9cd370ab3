"""bench/bench_steady.py's per-thread views: the stall watch's thread states read through
descriptors kept open, and each thread's CPU a record first minute against last."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bench_steady  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thread_states_keep_their_descriptors_and_follow_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sweep opens nothing once the threads are listed (one pread a file), sees a new
    thread at the next listing, and closes a gone thread's descriptors."""
    states = bench_steady.ThreadStates(os.getpid(), relist=2)
    try:
        first = states.read()
        assert threading.get_native_id() in first
        held = _open_fds()
        assert held >= 3 * len(first)

        def no_open(*args: object, **kwargs: object) -> None:
            raise AssertionError("a sweep opened a file")

        with monkeypatch.context() as m:
            m.setattr(os, "open", no_open)
            m.setattr("builtins.open", no_open)
            for _ in range(5):
                states.sweeps = 1  # not a listing sweep
                again = states.read()
                assert set(again) == set(first)
                assert again[threading.get_native_id()][0] == "R"  # this thread, reading
        assert _open_fds() == held

        stop, spun = threading.Event(), threading.Event()
        tid: list[int] = []

        def spin() -> None:
            tid.append(threading.get_native_id())
            end = time.thread_time() + 0.05
            while time.thread_time() < end:
                pass
            spun.set()
            stop.wait()

        worker = threading.Thread(target=spin)
        worker.start()
        spun.wait()
        states.sweeps = 0  # the next sweep lists the threads again
        found = states.read(waits=False)
        assert tid[0] in found
        assert found[tid[0]][2] > 0.0  # its CPU seconds
        assert found[tid[0]][0] in "RS"
        stop.set()
        worker.join()
        # join() returns when Python's thread is done; the OS task leaves /proc a moment later
        deadline = time.monotonic() + 5.0
        while Path(f"/proc/self/task/{tid[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        states.sweeps = 0
        assert tid[0] not in states.read()
        assert tid[0] not in states.fds
        assert _open_fds() == held
    finally:
        states.close()
    assert states.fds == {}


def test_one_shot_thread_states_match_and_leave_no_descriptor() -> None:
    before = _open_fds()
    found = bench_steady.thread_states(os.getpid())
    assert threading.get_native_id() in found
    assert _open_fds() == before


class _Svc:
    proc = None


def test_thread_drift_is_each_threads_cpu_a_record_first_and_last_minute() -> None:
    timeline: Any = bench_steady.Timeline(_Svc(), every=10.0)  # type: ignore[arg-type]
    timeline.pids = {}  # no process to name threads by (py-spy is not asked)
    rows = []
    for i in range(12):  # 120 s of 10-s intervals, 10,000 records each
        late = i >= 6
        rows.append({
            ("ctl", 11): 0.10,  # 10 us a record throughout
            ("w0", 22): 0.02 if not late else 0.03,  # 2 -> 3 us a record
            ("w0", 23): 0.000001,  # below 0.3 us a record: left out
            ("delivered", 0): 10_000.0,
        })
    rows.append({("ctl", 11): 5.0, ("delivered", 0): 0.0})  # no deliveries: not counted
    timeline.thread_rows = rows
    drift = {name: (round(a, 6), round(b, 6)) for name, a, b in timeline.thread_drift(60.0)}
    assert drift == {"ctl/t11": (10.0, 10.0), "w0/t22": (2.0, 3.0)}
