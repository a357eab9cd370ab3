"""A pod worker stopped while its service is being built (ingest/pod/worker.py).

The worker takes SIGTERM over (its drain) before `Service.build`; a build that never ended (a
store that does not answer) kept the worker running, SIGTERM or not, until the control plane's
SIGKILL at drain + 10 s. Now SIGTERM stops the build: the worker exits 0 at once (nothing was
read or written before `start`).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from ingest.config import Config
    from ingest.pod import worker
    from ingest.service import Service

    async def stuck(cls, cfg, shard=None):  # a build waiting on a store that never answers
        print("building", flush=True)
        await asyncio.sleep(3600)

    Service.build = classmethod(stuck)
    sys.exit(asyncio.run(worker.run(Config(), 0, 1, "/nonexistent/socket")))
    """
)


def test_sigterm_while_the_service_is_built_stops_the_worker(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={"PYTHONPATH": str(ROOT), "INGEST_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the build runs (or the child died)
        assert line.strip() == b"building", line + proc.stdout.read()
        time.sleep(0.5)  # the loop is in the build's await
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)  # before: never (SIGKILL at drain + 10 s)
        out = proc.stdout.read().decode()
        assert rc == 0, out
        assert time.monotonic() - sent < 30, out
        assert "stopped while building" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
