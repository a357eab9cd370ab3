"""An ordinary disk hiccup on purpose, for benches: `DiskHog` keeps the disk under a service's
data dir busy for a set window, and `FsyncProbe` measures what that does to a small
`fdatasync` (how slow "the disk" was), so a mitigation can be compared in an ABBA instead of
waiting for the host's disk to misbehave.

The load is `streams` loops of `dd if=/dev/zero bs=4M count=16 oflag=dsync` (64 MiB each,
every 4-MiB write synced before the next) into files beside the data dir, on the same
filesystem; removed at the end. On the 2-core dev VM (2026-12-03, load 9.5) four streams took
a 4-KiB write + `fdatasync` from p50 1.3 / p95 16 / max 23 ms to p50 22 / p95 248 / max 348 ms
(one 3-GiB `dd conv=fsync` did less: p95 47, max 282 ms). Run as child processes: their
waits in the kernel take no GIL from the bench.

    uv run python bench/disk_hog.py --dir /tmp/x --seconds 10 [--streams 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path


class DiskHog(threading.Thread):
    """From `at` seconds after `start()` for `seconds`, `streams` dd loops writing synced 4-MiB
    blocks into `directory` (see the module's docstring). Each stream is one shell loop
    started once (in a session of its own, killed whole at the end): the bench forks nothing
    while the disk is busy (a fork + exec of `dd` under the load took the bench's event loop
    away for seconds in one run)."""

    def __init__(self, directory: Path, at: float, seconds: float, streams: int = 4) -> None:
        super().__init__(daemon=True)
        self.directory, self.at, self.seconds, self.streams = directory, at, seconds, streams
        self.done = threading.Event()
        self.window: tuple[float, float] | None = None  # monotonic start and end, once run
        self.written_mb = 0

    def run(self) -> None:
        if self.done.wait(self.at):
            return
        files = [self.directory / f"disk-hog-{i}" for i in range(self.streams)]
        loop = (
            'n=0; while :; do dd if=/dev/zero of="$0" bs=4M count=16 oflag=dsync'
            ' 2>/dev/null; n=$((n + 1)); echo $n > "$0.count"; done'
        )
        start = time.monotonic()
        procs = [
            subprocess.Popen(["sh", "-c", loop, str(f)], start_new_session=True) for f in files
        ]
        try:
            self.done.wait(self.seconds)
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            self.window = (start, time.monotonic())
            for f in files:
                count = Path(f"{f}.count")
                with contextlib.suppress(OSError, ValueError):
                    self.written_mb += 64 * int(count.read_text())
                count.unlink(missing_ok=True)
                f.unlink(missing_ok=True)

    def stop(self) -> None:
        self.done.set()
        if self.is_alive():
            self.join()


class FsyncProbe(threading.Thread):
    """A 4-KiB write and `fdatasync` into `directory` every `every` seconds; the latencies
    with their monotonic times, to say how slow the disk was inside and outside a window."""

    def __init__(self, directory: Path, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.path, self.every = directory / "fsync-probe", every
        self.done = threading.Event()
        self.samples: list[tuple[float, float]] = []

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        block = os.urandom(4096)
        try:
            while not self.done.wait(self.every):
                t = time.monotonic()
                os.pwrite(fd, block, 0)
                os.fdatasync(fd)
                self.samples.append((t, time.monotonic() - t))
        finally:
            os.close(fd)
            self.path.unlink(missing_ok=True)

    def stop(self) -> None:
        self.done.set()
        if self.is_alive():
            self.join()

    def summary(self, window: tuple[float, float] | None = None, inside: bool = True) -> str:
        """p50 / p95 / max ms of the samples inside (or outside) `window` (all if None)."""
        xs = sorted(
            d
            for t, d in self.samples
            if window is None or (window[0] <= t < window[1]) == inside
        )
        if not xs:
            return "no samples"
        p = [xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3 for q in (0.5, 0.95)]
        return f"p50 {p[0]:.1f} / p95 {p[1]:.1f} / max {xs[-1] * 1e3:.1f} ms ({len(xs)} fsyncs)"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=4)
    a = ap.parse_args()
    probe = FsyncProbe(a.dir)
    probe.start()
    hog = DiskHog(a.dir, 2.0, a.seconds, a.streams)
    hog.start()
    hog.join()
    time.sleep(2.0)
    probe.stop()
    print(f"fdatasync of 4 KiB, hog ({hog.written_mb} MB written): {probe.summary(hog.window)}")
    print(f"without: {probe.summary(hog.window, inside=False)}; load {os.getloadavg()}")
