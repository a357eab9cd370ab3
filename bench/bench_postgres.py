"""Production path benchmark: N records (default 1M) from the inbox into the Postgres sink.

Measured in one run, on the same rows and the same table layout (the sink's own DDL):
  \\copy    `psql \\copy` of a CSV holding exactly the columns the sink stores (the limit)
  new      `ingest run` as a process in production mode (checkpoints and idempotency keys on
           Redis, DLQ on Postgres, Postgres sink): a JSON-lines file dropped in the inbox,
           timed until it is committed (moved to done/) — decode, validate, dedupe on Redis,
           binary COPY to staging + revision-guarded upsert, claims, checkpoint
  update   the same entities at revision 2: every row goes through the guarded UPDATE path
Prints records/s for each, the ratio to \\copy, p95 lag (ingest_lag_seconds histogram, per
phase), peak RSS of the service (VmHWM) and a profile (pyinstrument, in-process, on a smaller
run) of where the time goes. Uses the shared Postgres (a schema of its own, dropped after) and
a private Redis started with scripts/services/redis.sh on a free port.

    uv run python bench/bench_postgres.py [--records 1000000] [--profile-records 100000]
        [--window-keys N]   (N other keys claimed over the last 8 days first: steady state)
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_embedded import make_lines, peak_rss_mb, server_pid, tree_cpu_seconds  # noqa: E402

from ingest.pipeline.decode import Decoder  # noqa: E402
from ingest.records import RawRecord, Record  # noqa: E402
from ingest.sinks.postgres import COLUMNS, PostgresSink  # noqa: E402
from tests.e2e._auth import detailed, service_env  # noqa: E402
from tests.e2e._production import (  # noqa: E402
    drop_schema,
    fresh_schema,
    pg_bin,
    pg_execute,
    pg_query,
    private_redis,
    shared_env,
)
from tests.e2e._service import free_port  # noqa: E402

# The tenant's token bucket is a fairness limit, not what this measures: open it wide.
ADMISSION = {
    "default_limits": {"rate": 10_000_000, "burst": 10_000_000},
    "queue_high_watermark": 100_000_000,
    "queue_low_watermark": 1_000_000,
}


def config_for(
    redis_url: str,
    dsn: str,
    table: str,
    data_dir: Path | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    source: dict[str, Any] = {"type": "inbox", "name": "inbox", "poll_seconds": 0.1}
    if batch_size is not None:
        source["batch_size"] = batch_size
    cfg: dict[str, Any] = {
        "state": {"kind": "production", "redis_url": redis_url, "postgres_url": dsn},
        "sinks": [{"type": "postgres", "name": "postgres", "table": table}],
        "sources": [source],
        "admission": ADMISSION,
    }
    if data_dir is not None:
        cfg["data_dir"] = str(data_dir)
    if workers is not None:
        cfg["workers"] = workers
    return cfg


# ---------------------------------------------------------------------- the \copy limit
def csv_of(lines: list[bytes], path: Path) -> int:
    """CSV of exactly the rows the sink stores (PostgresSink.row_of), in COLUMNS order."""
    decoder = Decoder()
    raws = [
        RawRecord(data=ln, tenant="acme-corp", source="inbox", seq=i, position=None, event_time=0.0)
        for i, ln in enumerate(lines)
    ]
    n = 0
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        for rec in decoder.decode_many(raws):
            if not isinstance(rec, Record):
                continue
            row = PostgresSink.row_of(rec)
            out: list[Any] = []
            for v in row:
                if isinstance(v, bytes) and v is row[-1]:
                    out.append("\\x" + v.hex())
                elif isinstance(v, bytes):
                    out.append(v.decode())
                elif isinstance(v, bool):
                    out.append("t" if v else "f")
                elif v is None:
                    out.append(None)
                elif hasattr(v, "isoformat"):
                    out.append(v.isoformat())
                else:
                    out.append(v)
            w.writerow(out)
            n += 1
    return n


def psql_copy(dsn: str, schema: str, table: str, path: Path) -> float:
    """Time `psql \\copy` of the CSV into `table` (created with the sink's own DDL)."""

    async def create() -> None:
        sink = PostgresSink("limit", dsn, table)
        await sink.start()
        await sink.close()

    asyncio.run(create())
    url = shared_env()["INGEST_TEST_POSTGRES_URL"]
    cols = ", ".join(COLUMNS)
    cmd = [
        str(pg_bin() / "psql"),
        url,
        "-v",
        "ON_ERROR_STOP=1",
        "-qc",
        f"\\copy {schema}.{table} ({cols}) FROM '{path}' WITH (FORMAT csv)",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=1800)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------- the service
def histogram(metrics: str, name: str = "ingest_lag_seconds") -> dict[float, float]:
    buckets: dict[float, float] = {}
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="')[1].split('"')[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def p95(before: dict[float, float], after: dict[float, float]) -> float | None:
    delta = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in after}
    total = delta.get(float("inf"), 0.0)
    if not total:
        return None
    for bound in sorted(delta):
        if delta[bound] >= 0.95 * total:
            return bound
    return None


class Service:
    def __init__(self, workdir: Path, cfg: dict[str, Any], port: int) -> None:
        self.data = workdir / "svc"
        self.inbox = self.data / "inbox" / "acme-corp"
        self.inbox.mkdir(parents=True)
        self.workdir = workdir
        config = workdir / "bench.yaml"
        config.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "INGEST_DATA_DIR": str(self.data), **service_env(self.data)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ingest.cli.ingest",
                "run",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "WARNING",
                "--config",
                str(config),
            ],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if detailed(self.url, 2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("the service exited at start")
            time.sleep(0.1)
        raise RuntimeError("the service did not start")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def run_file(
        self, lines: list[bytes], name: str, files: int = 1, servers: dict[str, int] | None = None
    ) -> tuple[float, float | None, dict[str, float]]:
        """Drop the records as `files` files at once, wait until all are committed:
        (records/s, p95 lag of this phase, CPU µs per record of the service and `servers`)."""
        pids = {"service": self.proc.pid, **(servers or {})}
        before = histogram(self.metrics())
        names = [f"{i}-{name}" for i in range(files)]
        for i, part in enumerate(names):
            chunk = lines[i * len(lines) // files : (i + 1) * len(lines) // files]
            (self.workdir / f"{part}.staged").write_bytes(b"\n".join(chunk) + b"\n")
        cpu0 = {who: tree_cpu_seconds(pid) for who, pid in pids.items()}
        t0 = time.perf_counter()
        print(f"{name}: files dropped at {time.time():.3f} (wall clock, to line up traces)")
        for part in names:
            os.replace(self.workdir / f"{part}.staged", self.inbox / part)
        while any((self.inbox / part).exists() for part in names):
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        cpu = {
            who: (tree_cpu_seconds(pid) - cpu0[who]) / len(lines) * 1e6 for who, pid in pids.items()
        }
        return len(lines) / elapsed, p95(before, histogram(self.metrics())), cpu

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def postgres_and_redis(redis_port: int) -> dict[str, int]:
    """The bench's Postgres (its postmaster.pid in the run dir, if this machine runs it) and
    private Redis, for their CPU per record; absent ones are left out."""
    found: dict[str, int] = {}
    pidfile = (
        Path(os.environ.get("INGEST_RUN_DIR", "/nonexistent")) / "postgres/data/postmaster.pid"
    )
    if pidfile.exists():
        found["postgres"] = int(pidfile.read_text().split()[0])
    pid = server_pid("redis-server", f":{redis_port}")
    if pid is not None:
        found["redis"] = pid
    return found


def fill_window(redis_url: str, n: int, days: int = 8) -> dict[str, Any]:
    """Claim `n` random keys spread over the `days` days up to now through the service's own
    store (clock faked), so that the service's lookups meet a populated idempotency window, as
    in steady state, instead of an empty Redis (day one). Returns the store's stats()."""
    from ingest.state.redis import RedisIdempotencyStore, redis_client

    async def go() -> dict[str, Any]:
        client = redis_client(redis_url)
        now = time.time()
        clock = [now]
        store = RedisIdempotencyStore(client, server_clock=lambda: clock[0])
        for i in range(0, n, 2000):
            clock[0] = now - (days - 1 - i * days // n) * 86400
            blob = os.urandom(32 * min(2000, n - i))
            await store.claim([blob[j : j + 32] for j in range(0, len(blob), 32)])
        stats = await store.stats()
        await client.aclose()
        return stats

    return asyncio.run(go())


def profile(
    lines: list[bytes], updates: list[bytes], workdir: Path, redis_url: str, dsn: str
) -> str:
    """Where the time goes: the service in-process under pyinstrument (new rows + updates)."""
    from pyinstrument import Profiler

    from ingest.config import parse_config
    from ingest.service import Service as InProcess

    data = workdir / "prof"
    inbox = data / "inbox" / "acme-corp"
    inbox.mkdir(parents=True)

    async def go() -> None:
        cfg = parse_config(config_for(redis_url, dsn, "prof_entities", data))
        service = await InProcess.build(cfg)
        await service.start()
        for name, batch in (("p1.jsonl", lines), ("p2.jsonl", updates)):
            (workdir / name).write_bytes(b"\n".join(batch) + b"\n")
            os.replace(workdir / name, inbox / name)
            while (inbox / name).exists():
                await asyncio.sleep(0.05)
        await service.shutdown()

    profiler = Profiler(async_mode="enabled")
    profiler.start()
    asyncio.run(go())
    profiler.stop()
    return str(profiler.output_text(unicode=False, color=False, show_all=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--profile-records", type=int, default=100_000)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument(
        "--batch-size", type=int, default=None, help="inbox batch_size (default: config's)"
    )
    ap.add_argument("--workers", type=int, default=None, help="pod workers (default: config's)")
    ap.add_argument("--files", type=int, default=1, help="split the records into this many files")
    ap.add_argument(
        "--window-keys",
        type=int,
        default=0,
        help="first claim this many other keys over the last 8 days (steady-state lookups)",
    )
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    url = shared_env()["INGEST_TEST_POSTGRES_URL"]
    schema, dsn = fresh_schema(url, "bench_pg")
    redis = private_redis()
    try:
        print(
            f"machine: {platform.node()} {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, load average {os.getloadavg()}"
        )
        print(f"postgres: {pg_query(url, 'SHOW server_version')[0][0]}; redis: {redis.url}")
        lines = make_lines(args.records, 1)
        updates = make_lines(args.records, 2)
        n_csv = csv_of(lines, workdir / "rows.csv")
        assert n_csv == args.records
        pg_pid = postgres_and_redis(redis.port).get("postgres")
        pg0 = tree_cpu_seconds(pg_pid) if pg_pid else 0.0
        copy_s = psql_copy(dsn, schema, "copy_entities", workdir / "rows.csv")
        copy_rate = args.records / copy_s
        copy_pg_us = (tree_cpu_seconds(pg_pid) - pg0) / args.records * 1e6 if pg_pid else None
        # The limit's table is not read again. Dropped now, its autovacuum (insert-triggered,
        # within a minute of the copy: a scan and hint-bit write of every row) cannot land in
        # the pipeline's phases, whose Postgres CPU and cores it would share.
        pg_execute(dsn, "DROP TABLE copy_entities CASCADE")  # and its view

        if args.window_keys:
            t0 = time.perf_counter()
            w = fill_window(redis.url, args.window_keys)
            print(
                f"idempotency window: {w['keys']:,} keys over 8 days in {w['buckets']} buckets,"
                f" {w['bytes_per_key']} B/key ({time.perf_counter() - t0:.0f} s)"
            )
        cfg = config_for(redis.url, dsn, "entities", None, args.batch_size, args.workers)
        print(
            f"batch_size {args.batch_size or 'default'}, workers {args.workers or 'default'},"
            f" {args.files} file(s)"
        )
        svc = Service(workdir, cfg, args.port or free_port())
        print(f"CPU measured for: service, {', '.join(postgres_and_redis(redis.port))}")
        try:
            servers = postgres_and_redis(redis.port)
            new_rate, new_p95, new_cpu = svc.run_file(lines, "new.jsonl", args.files, servers)
            upd_rate, upd_p95, upd_cpu = svc.run_file(updates, "update.jsonl", args.files, servers)
            rss = peak_rss_mb(svc.proc.pid)
        finally:
            svc.stop()
        count, revs = pg_query(dsn, "SELECT count(*), sum(revision) FROM entities")[0]
        assert count == args.records and revs == 2 * args.records, (count, revs)
        dlq = pg_query(dsn, "SELECT count(*) FROM dlq")[0][0]
        assert dlq == 0, f"{dlq} DLQ rows"

        print(f"records:                  {args.records}")
        print(f"psql \\copy (limit):       {copy_rate:,.0f} records/s ({copy_s:.1f} s)")
        print(
            f"pipeline, new rows:       {new_rate:,.0f} records/s  "
            f"({new_rate / copy_rate:.2f}x of \\copy), p95 lag <= {new_p95} s"
        )
        print(
            f"pipeline, rev-2 updates:  {upd_rate:,.0f} records/s  "
            f"({upd_rate / copy_rate:.2f}x of \\copy), p95 lag <= {upd_p95} s"
        )
        if copy_pg_us is not None:
            print(f"CPU µs/record, \\copy:    postgres {copy_pg_us:.1f}")
        for phase, cpu in (("new rows", new_cpu), ("updates", upd_cpu)):
            shown = ", ".join(f"{who} {us:.1f}" for who, us in cpu.items())
            print(f"CPU µs/record, {phase + ':':10}{shown}")
        print(f"peak RSS (service):       {rss:.0f} MB")
        print(f"load average after:       {os.getloadavg()}")
        if args.profile_records:
            n = min(args.profile_records, args.records)
            print(f"\nprofile ({n} new + {n} updates, in-process, pyinstrument):")
            print(profile(lines[:n], updates[:n], workdir, redis.url, dsn))
    finally:
        redis.close()
        drop_schema(url, schema)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
