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

`--objects N` puts N objects of 1,000 lines under the prefix (uploaded once, untimed) and
times, from the process start, the first row in the sink and every object done (what
bench_s3.py's start-up costs its run, not only /health/detailed); each start gets a fresh
Postgres schema (leases, sink table) and a flushed private Redis; it also prints the seconds
from the first worker's fork to the first row (a worker's own start-up, without the fork
server's imports and their noise under load). `--old-tree PATH` alternates
each repeat between this tree and PATH (old, new, new, old, ...), for A/B in one window:

    uv run python bench/bench_startup.py --workers 2 --objects 10 --repeat 20 --old-tree /tmp/old

Run old code with the same script: PYTHONPATH=<old tree> uv run python bench/bench_startup.py
(the service and its workers import `ingest` from PYTHONPATH first).
"""

from __future__ import annotations

import argparse
import asyncio
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

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_s3 import ReadyPoller  # noqa: E402

from tests.e2e._auth import service_env  # noqa: E402
from tests.e2e._files import delete_prefix, files_config, lines, s3_source, upload  # noqa: E402
from tests.e2e._production import (  # noqa: E402
    drop_schema,
    fresh_schema,
    private_redis,
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


def started_at(pid: int) -> float:
    """When `pid` started, seconds since boot (CLOCK_BOOTTIME; /proc's 10-ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / _TICK


def first_fork(pid: int) -> float | None:
    """When the pod under `pid` forked its first worker (seconds since boot), None if none."""
    forks = [started_at(w) for c in children(pid) if label(c) == "forkserver" for w in children(c)]
    return min(forks) if forks else None


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


class SinkPoller:
    """The first row in the sink table and the objects done in the lease table of a fresh
    schema, over one connection kept open (polled every POLL_SECONDS)."""

    def __init__(self, dsn: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._conn = self._loop.run_until_complete(asyncpg.connect(dsn))

    def _fetch(self, sql: str) -> int:
        return int(self._loop.run_until_complete(self._conn.fetchval(sql)) or 0)

    def rows(self) -> int:
        if not self._fetch("SELECT count(*) FROM pg_class WHERE oid = to_regclass('entities')"):
            return 0
        return self._fetch("SELECT count(*) FROM (SELECT 1 FROM entities LIMIT 1) x")

    def done(self) -> int:
        if not self._fetch(
            "SELECT count(*) FROM pg_class WHERE oid = to_regclass('ingest_source_leases')"
        ):
            return 0
        return self._fetch("SELECT count(*) FROM ingest_source_leases WHERE done_version = version")

    def close(self) -> None:
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


POLL_SECONDS = 0.01


def start_once(
    config: Path,
    workdir: Path,
    workers: int,
    objects: int = 0,
    dsn: str = "",
    pythonpath: str | None = None,
) -> tuple[float, dict[str, float], float, float, dict[str, float], float]:
    """(seconds from process start to /health/detailed answering, CPU seconds by process;
    with `objects`: seconds to the sink's first row and to every object done, CPU seconds
    by process at the first row, and seconds from the first worker's fork to the first row)."""
    env = {
        **os.environ,
        "INGEST_DATA_DIR": str(workdir / "svc"),
        "INGEST_WORKERS": str(workers),
        **service_env(workdir),
    }
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    port = free_port()
    log = (workdir / "service.log").open("wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest.cli.ingest", "run", "--host", "127.0.0.1", "--port",
         str(port), "--log-level", "WARNING", "--config", str(config)],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    first = done = fork_row = 0.0
    cpu_first: dict[str, float] = {}
    try:
        if objects:  # the sink's first row, then every object done; ready after
            poller = SinkPoller(dsn)
            try:
                while not poller.rows():
                    if proc.poll() is not None:
                        raise RuntimeError((workdir / "service.log").read_text())
                    time.sleep(POLL_SECONDS)
                first = time.perf_counter() - t0
                forked = first_fork(proc.pid)
                if forked is not None:  # without the imports before the fork and their noise
                    fork_row = time.clock_gettime(time.CLOCK_BOOTTIME) - forked
                cpu_first = pod_cpu(proc.pid)
                while poller.done() < objects:
                    if proc.poll() is not None:
                        raise RuntimeError((workdir / "service.log").read_text())
                    time.sleep(POLL_SECONDS)
                done = time.perf_counter() - t0
            finally:
                poller.close()
        ready_poller = ReadyPoller(f"http://127.0.0.1:{port}")  # one client: ~0.4 ms a poll
        try:
            while not ready_poller.ready():
                if proc.poll() is not None:
                    raise RuntimeError((workdir / "service.log").read_text())
                time.sleep(0.05)
        finally:
            ready_poller.close()
        ready = time.perf_counter() - t0
        cpu = pod_cpu(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    return ready, cpu, first, done, cpu_first, fork_row


def objects_run(args: argparse.Namespace, env: dict[str, str], workdir: Path) -> None:
    """`--objects`: starts on N objects, each on a fresh schema and a flushed Redis,
    alternated with `--old-tree` if given."""
    import redis as redis_sync

    url = env["INGEST_TEST_POSTGRES_URL"]
    run = uuid.uuid4().hex[:8]
    prefix = f"bench-startup-{run}/"
    upload({f"{prefix}{i:05d}.jsonl": lines(f"{run}-{i}", 1000) for i in range(args.objects)})
    private = private_redis()
    trees = ["new"] if args.old_tree is None else ["old", "new"]
    results: dict[str, list[tuple[float, float, float, float, float]]] = {t: [] for t in trees}
    try:
        for workers in args.workers:
            for i in range(args.repeat):
                order = trees if i % 2 == 0 else trees[::-1]
                for tree in order:
                    schema, dsn = fresh_schema(url, "bench_startup")
                    redis_sync.Redis.from_url(private.url).flushall()
                    config = files_config(
                        workdir / "bench.yaml",
                        redis_url=redis_with_db(private.url, 0),
                        postgres_url=dsn,
                        sources=[s3_source(prefix)],
                    )
                    try:
                        path = args.old_tree if tree == "old" else os.environ.get("PYTHONPATH", "")
                        ready, cpu_end, first, done, cpu_first, fork_row = start_once(
                            config, workdir, workers, args.objects, dsn, path
                        )
                    finally:
                        drop_schema(url, schema)
                    results[tree].append((first, done, sum(cpu_first.values()), ready, fork_row))
                    print(
                        f"  {time.strftime('%H:%M:%S')} {tree} workers={workers}: first row"
                        f" {first:.3f} s ({fork_row:.3f} after the first fork),"
                        f" all {args.objects} done {done:.3f} s,"
                        f" ready {ready:.3f} s;"
                        f" CPU s at first row {sum(cpu_first.values()):.2f} ("
                        + ", ".join(f"{k} {v:.2f}" for k, v in cpu_first.items())
                        + f"); CPU s after all done {sum(cpu_end.values()):.2f} ("
                        + ", ".join(f"{k} {v:.2f}" for k, v in cpu_end.items())
                        + f"); load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
            for tree in trees:
                rs = results[tree]
                print(
                    f"{tree} workers={workers}, {len(rs)} starts, medians: first row"
                    f" {statistics.median(r[0] for r in rs):.3f} s, all done"
                    f" {statistics.median(r[1] for r in rs):.3f} s, fork to first row"
                    f" {statistics.median(r[4] for r in rs):.3f} s, CPU s at first row"
                    f" {statistics.median(r[2] for r in rs):.2f}"
                )
            if args.old_tree is not None:
                pairs = list(zip(results["old"], results["new"], strict=True))
                for k, what in (
                    (0, "first row"),
                    (4, "fork to first row"),
                    (1, "all done"),
                    (2, "CPU at first row"),
                ):
                    diffs = [n[k] - o[k] for o, n in pairs]
                    wins = sum(d < 0 for d in diffs)
                    print(
                        f"  new - old, {what}: median {statistics.median(diffs):+.3f},"
                        f" mean {statistics.mean(diffs):+.3f}; new lower in {wins} of {len(diffs)}"
                    )
            results = {t: [] for t in trees}
    finally:
        private.close()
        delete_prefix(prefix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--objects", type=int, default=0, help="objects of 1,000 lines to read")
    ap.add_argument("--old-tree", default=None, help="alternate with this PYTHONPATH (old)")
    args = ap.parse_args()
    env = shared_env()
    workdir = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    if args.objects:
        print(f"{os.cpu_count()} cores, load average before {os.getloadavg()}")
        try:
            objects_run(args, env, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(f"load average after {os.getloadavg()}")
        return
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
            runs = [start_once(config, workdir, workers)[:2] for _ in range(args.repeat)]
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
