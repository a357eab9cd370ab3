"""Kill -9 a writer at a chosen instant: shared by the SQLite crash tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def kill_writer(script: str, args: list[str], first: int, delay: float) -> int:
    """Run `script` (`python -c`, from the repository's root) with `args`; once it printed
    `first` lines (each a number: what it has committed), wait `delay` seconds, SIGKILL it,
    and return the last number it printed before the kill landed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    for _ in range(first):
        line = proc.stdout.readline()
        assert line, f"writer ended: {proc.wait()}"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    written = int(line)
    for line in proc.stdout:  # what it reported before the kill landed
        written = int(line)
    proc.wait()
    return written
