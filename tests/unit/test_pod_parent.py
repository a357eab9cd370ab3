"""A worker whose fork server died before the worker armed PR_SET_PDEATHSIG exits at once
(`ingest.pod.worker.die_with_parent`): by then it has been handed to init or a subreaper,
which the death signal would watch instead, so it would run on beside its replacement.

The race is made certain: the "fork server" (a child of this test) forks the "worker" and
exits; the worker calls die_with_parent only once it has been re-parented. The control plane
(this test process) stays alive throughout, so only the parent comparison can catch it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from ingest.pod.worker import die_with_parent
    out, control_plane = sys.argv[1], int(sys.argv[2])
    fork_server = os.getpid()
    pid = os.fork()
    if pid:  # the fork server: tell the worker's pid, die before it arms the death signal
        print(pid, flush=True)
        os._exit(0)
    os.setsid()  # out of the test's process group and pipes: a survivor holds nothing up
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    deadline = time.monotonic() + 30
    while os.getppid() == fork_server and time.monotonic() < deadline:
        time.sleep(0.01)
    die_with_parent(fork_server, control_plane)
    with open(out, "w") as f:
        f.write("survived")
    time.sleep(30)
    """
)


def test_a_worker_orphaned_before_prctl_exits(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), str(os.getpid())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    worker = int(done.stdout.split()[0])

    def gone() -> bool:
        try:
            return psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    try:
        wait_for(lambda: gone() or out.exists(), timeout=30)
        assert not out.exists(), "the orphaned worker went on running"
    finally:
        if not gone():
            os.kill(worker, 9)
