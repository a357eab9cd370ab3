"""One `ingest run` per embedded data dir.

Two embedded services on the same data dir would both read its webhook intake (each record
processed twice: the sinks stay right through idempotency, but the work and the counters
double) and each keep its own backpressure state. `hold` takes an exclusive lock on
`<data_dir>/ingest.lock` for the life of the process; a second service is refused with a
message naming the holder. The kernel drops the lock when the process ends, kill -9
included, so a restart never finds a stale lock. A pod's workers are exec'd processes that do
not inherit it; the CLIs (dlqtriage, replayctl, ingest records) do not take it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from ingest.errors import IngestError

LOCK_NAME = "ingest.lock"


class DataDirInUse(IngestError):
    """Another live process holds the data dir."""


def hold(data_dir: Path, port: int | None = None) -> IO[str]:
    """Lock `data_dir` for this process (keep the returned file open) or raise DataDirInUse."""
    data_dir.mkdir(parents=True, exist_ok=True)
    f = open(data_dir / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise DataDirInUse(
            f"data dir {data_dir.resolve()} is in use by another `ingest run` ({holder}); "
            "stop that one first, or give this one its own data dir (INGEST_DATA_DIR or "
            "data_dir in the config)"
        ) from None
    f.seek(0)
    f.truncate()
    where = f", port {port}" if port is not None else ""
    f.write(f"pid {os.getpid()} on {socket.gethostname()}{where}\n")
    f.flush()
    return f
