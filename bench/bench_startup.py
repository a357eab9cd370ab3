"""Start-up of `ingest run` with one S3 source (bench_s3.py's configuration): time to ready, CPU.

For each worker count asked (INGEST_WORKERS), starts the service as bench_s3.py does (Redis +
Postgres state, Postgres sink, one S3 source on an empty prefix), polls /health/detailed as
bench_s3.py does until it answers, and prints the wall time from the process start to that
answer and the CPU seconds (user + system) each process of the pod had spent by then: the
control plane (or the single process), each worker, and the fork server and multiprocessing's
resource tracker where workers are forked (a fork's CPU counts from its fork). Then SIGTERM.
On a shared, loaded machine compare the CPU seconds: the wall time depends on what else runs.
Needs
`scripts/services/up.sh seaweedfs postgres redis`.

    uv run python bench/bench_startup.py [--workers 1 2] [--repeat 3]

Run old code with the same script: PYTHONPATH=<old tree> uv run python bench/bench_startup.py
(the service and its workers import `ingest` from PYTHONPATH first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e._auth import detailed, service_env  # noqa: E402
from tests.e2e._files import files_config, s3_source  # noqa: E402
from tests.e2e._production import (  # noqa: E402
    drop_schema,
    fresh_schema,
    redis_with_db,
    shared_env,
)
from tests.e2e._service import free_port  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of `pid` itself (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return sorted(out)


def label(pid: int) -> str:
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    if b"resource_tracker" in cmd:
        return "tracker"
    return "forkserver" if b"forkserver" in cmd else "worker"


def pod_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the service and every process under it, by role: the control plane (or
    single process), workers (exec'd children, or forks of the fork server), fork server and
    multiprocessing's resource tracker."""
    out = {"control": cpu_seconds(pid)}
    todo = [(c, label(c)) for c in children(pid)]
    n = 0
    while todo:
        child, role = todo.pop(0)
        if role == "forkserver":
            out["forkserver"] = cpu_seconds(child)
            todo += [(c, "worker") for c in children(child)]
        elif role == "tracker":
            out["tracker"] = cpu_seconds(child)
        else:
            out[f"w{n}"] = cpu_seconds(child)
            n += 1
    return out


def start_once(config: Path, workdir: Path, workers: int) -> tuple[float, dict[str, float]]:
    """(seconds from process start to /health/detailed answering, CPU seconds by process)."""
    env = {
        **os.environ,
        "INGEST_DATA_DIR": str(workdir / "svc"),
        "INGEST_WORKERS": str(workers),
        **service_env(workdir),
    }
    port = free_port()
    log = (workdir / "service.log").open("wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest.cli.ingest", "run", "--host", "127.0.0.1", "--port",
         str(port), "--log-level", "WARNING", "--config", str(config)],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        while True:
            try:
                detailed(f"http://127.0.0.1:{port}", 1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise RuntimeError((workdir / "service.log").read_text()) from None
                time.sleep(0.05)
        ready = time.perf_counter() - t0
        cpu = pod_cpu(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    return ready, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    env = shared_env()
    workdir = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    schema, dsn = fresh_schema(env["INGEST_TEST_POSTGRES_URL"], "bench_startup")
    prefix = f"bench-startup-{uuid.uuid4().hex[:8]}/"  # nothing under it: start-up only
    config = files_config(
        workdir / "bench.yaml",
        redis_url=redis_with_db(env["INGEST_TEST_REDIS_URL"], 0),
        postgres_url=dsn,
        sources=[s3_source(prefix)],
    )
    print(f"{os.cpu_count()} cores, load average before {os.getloadavg()}")
    try:
        for workers in args.workers:
            runs = [start_once(config, workdir, workers) for _ in range(args.repeat)]
            walls = [r[0] for r in runs]
            names = list(runs[0][1])
            if workers == 1:
                names = ["control"]
            cpus = ", ".join(
                f"{'single' if workers == 1 else n} "
                f"{statistics.median(r[1].get(n, 0.0) for r in runs):.2f}"
                for n in names
            )
            total = statistics.median(sum(r[1].values()) for r in runs)
            print(
                f"workers={workers}: ready after {statistics.median(walls):.2f} s wall (median of"
                f" {args.repeat}: {', '.join(f'{w:.2f}' for w in walls)}); CPU s at ready:"
                f" {cpus}; all processes {total:.2f}"
            )
    finally:
        drop_schema(env["INGEST_TEST_POSTGRES_URL"], schema)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
