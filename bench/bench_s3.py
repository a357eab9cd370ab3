"""S3 -> Postgres benchmark: N records (default 1M) in M objects (default 200), end to end.

Measured in one run, on the same objects, rows and table layout:
  pipeline  `ingest run` as a process in production mode (Redis + Postgres state, Postgres
            sink, one S3 source; tenant token bucket opened wide as in bench_embedded.py),
            timed from upload complete to every object done in the lease table (the service is
            started after the upload, so its start-up is inside the time)
  raw GET   the same objects fetched with aiobotocore (concurrency 8), bytes only: S3's limit
  \\copy     `psql \\copy` of exactly the rows the sink stores into a table of the same layout
            (columns, key, check, fillfactor): Postgres's bulk-load limit
Prints records/s for each, the ratios, p95 lag (ingest_lag_seconds histogram; event time is the
object's LastModified, so objects queued behind others count their wait), peak RSS (VmHWM) of
the service, and CPU µs per record (user + system) of the service's process tree, the bench's
Postgres and its private Redis from service ready to all done. Needs
`scripts/services/up.sh seaweedfs postgres redis`; starts a private Redis (so idempotency keys
do not land in the shared one) and uses a fresh Postgres schema and a fresh bucket prefix, all
removed afterwards.

    uv run python bench/bench_s3.py [--records 1000000] [--objects 200] [--cold-bytecode]

Start-up is timed with the modules' bytecode compiled, as the image ships them
(`UV_COMPILE_BYTECODE=1` in the Dockerfile): before the clock starts, `compileall` writes what
is missing next to the sources of the venv and of `ingest` (a no-op once done). A dev venv from
`uv sync` has none, and with PYTHONDONTWRITEBYTECODE=1 in the environment (as on the dev VM)
every process of the pod compiled every module it imports at each start: ~2.3 s more CPU per
process, on the same 2 cores. `--cold-bytecode` skips that step (the older measure).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiobotocore.session import get_session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_embedded import p95_from_histogram, peak_rss_mb  # noqa: E402
from bench_postgres import postgres_and_redis  # noqa: E402

from ingest.pipeline.decode import Decoder  # noqa: E402
from ingest.records import RawRecord, Record  # noqa: E402
from ingest.sinks.postgres import COLUMNS, PostgresSink  # noqa: E402
from tests.e2e._auth import bearer, service_env  # noqa: E402
from tests.e2e._files import (  # noqa: E402
    BUCKET,
    client_kwargs,
    delete_prefix,
    files_config,
    lines,
    s3_env,
    s3_source,
    sink_count,
    upload,
)
from tests.e2e._production import (  # noqa: E402
    drop_schema,
    fresh_schema,
    pg_execute,
    pg_query,
    private_redis,
    redis_with_db,
    shared_env,
)
from tests.e2e._service import free_port  # noqa: E402


def make_objects(prefix: str, records: int, objects: int, run: str) -> dict[str, bytes]:
    per, extra = divmod(records, objects)
    return {
        f"{prefix}{i:05d}.jsonl": lines(f"{run}-{i}", per + (1 if i < extra else 0))
        for i in range(objects)
    }


async def raw_get(keys: list[str], concurrency: int) -> tuple[int, int, float]:
    """Bytes and lines of every object by concurrent GETs; (bytes, lines, seconds)."""
    sem = asyncio.Semaphore(concurrency)
    nbytes = nlines = 0
    async with get_session().create_client("s3", **client_kwargs(s3_env())) as s3:

        async def get(key: str) -> None:
            nonlocal nbytes, nlines
            async with sem:
                resp = await s3.get_object(Bucket=BUCKET, Key=key)
                async with resp["Body"] as body:
                    while chunk := await body.read(1 << 20):
                        nbytes += len(chunk)
                        nlines += chunk.count(b"\n")

        t0 = time.perf_counter()
        await asyncio.gather(*(get(k) for k in keys))
        return nbytes, nlines, time.perf_counter() - t0


def _text(value: Any, binary: bool = False) -> str:
    """One field in COPY text format (`binary`: a bytea column, else bytes are JSON text)."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, bytes | bytearray | memoryview):
        if binary:
            return "\\\\x" + bytes(value).hex()  # bytea hex, backslash escaped
        value = bytes(value).decode()
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    s = str(value)
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


_BYTEA = [c == "dedupe_key" for c in COLUMNS]


def copy_file(bodies: list[bytes], path: Path) -> int:
    """The rows the sink stores (Decoder + PostgresSink.row_of) as a COPY text file."""
    decoder = Decoder()
    n = 0
    with path.open("w") as out:
        for body in bodies:
            raws = [
                RawRecord(data=ln, tenant="acme-corp", source="s3-main", seq=i, position=None,
                          event_time=0.0)
                for i, ln in enumerate(body.splitlines())
            ]  # fmt: skip
            for rec in decoder.decode_many(raws):
                if isinstance(rec, Record):
                    row = PostgresSink.row_of(rec)
                    out.write(
                        "\t".join(_text(v, b) for v, b in zip(row, _BYTEA, strict=True)) + "\n"
                    )
                    n += 1
    return n


def psql_copy(url: str, schema: str, path: Path) -> float:
    """`\\copy` into a table of the sink table's layout: its columns, key and check (LIKE ...
    INCLUDING ALL) and its storage parameters, which LIKE does not copy: the sink's
    `fillfactor` (50 by default) doubles the heap \\copy writes (at 1M, 411 MB against 204 MB,
    more than the bench Postgres's 256 MB of shared_buffers), as bench_postgres.py's and
    bench_kafka.py's limit tables (made by the sink's own DDL) have it."""
    table = f"{schema}.copy_limit"
    (opts,) = pg_query(
        url,
        "SELECT coalesce(array_to_string(reloptions, ', '), '') FROM pg_class"
        f" WHERE oid = '{schema}.entities'::regclass",
    )[0]
    storage = f" WITH ({opts})" if opts else ""
    pg_execute(url, f"CREATE TABLE {table} (LIKE {schema}.entities INCLUDING ALL){storage}")
    cmd = f"\\copy {table} ({', '.join(COLUMNS)}) FROM '{path}'"
    t0 = time.perf_counter()
    subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-q", "-c", cmd], check=True)
    return time.perf_counter() - t0


def compile_bytecode() -> float:
    """Write the missing .pyc of the venv's packages and of `ingest` (what the image ships;
    see the module docstring); returns the seconds it took (not part of any timing)."""
    import sysconfig

    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    dirs = [sysconfig.get_paths()["purelib"], str(ROOT / "ingest")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j0", *dirs], env=env,
                   stdout=subprocess.DEVNULL, check=False)  # fmt: skip
    return time.perf_counter() - t0


POLL_SECONDS = 0.05  # the end is seen within this of the last object done (was 0.2 s)


class ReadyPoller:
    """/health/detailed asked over one httpx client kept open, until it answers. A fresh client
    a poll (`httpx.get`: a new SSL context with certifi's CA bundle loaded each time) cost the
    bench ~15-35 ms of CPU a poll, every 0.1 s of the service's start-up: a bench process
    competing with the fork server's imports for the same two cores (docs/benchmarks.md,
    s3up). Kept open, a poll costs ~0.4 ms; made with `verify=False` (the service is plain
    HTTP on 127.0.0.1: nothing to verify), the client loads no CA bundle either."""

    def __init__(self, url: str) -> None:
        self._client = httpx.Client(timeout=1.0, headers=bearer(), verify=False)
        self._url = f"{url}/health/detailed"

    def ready(self) -> bool:
        try:
            self._client.get(self._url)
        except httpx.HTTPError:
            return False
        return True

    def close(self) -> None:
        self._client.close()


def trees_cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """`bench_embedded.tree_cpu_seconds` of every pid in `pids`, from one walk of /proc (the
    bench reads them at service ready, inside the timed run: three walks cost ~10-25 ms)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
    kids: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        kids.setdefault(int(fields[1]), []).append(pid)
    out = {}
    for who, root in pids.items():
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                total += sum(int(f) for f in stats[pid][11:15]) / tick
            todo += kids.get(pid, [])
        out[who] = total
    return out


class DonePoller:
    """Objects of `source` done in the lease table, read over one connection kept open (a
    connection per poll forked a Postgres backend each time: CPU counted as Postgres's)."""

    def __init__(self, dsn: str, source: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._conn = self._loop.run_until_complete(asyncpg.connect(dsn))
        self._source = source

    def count(self) -> int:
        return int(
            self._loop.run_until_complete(
                self._conn.fetchval(
                    "SELECT count(*) FROM ingest_source_leases"
                    " WHERE source = $1 AND done_version = version",
                    self._source,
                )
            )
            or 0
        )

    def __enter__(self) -> DonePoller:
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


def service_env_for(workdir: Path) -> dict[str, str]:
    """`ingest run`'s environment, made before the clock starts: writing the credentials file
    (like the config) is the bench's work, not the service's start-up."""
    return {**os.environ, "INGEST_DATA_DIR": str(workdir / "svc"), **service_env(workdir)}


def run_service(
    config: Path,
    env: dict[str, str],
    workdir: Path,
    port: int,
    dsn: str,
    objects: int,
    t_uploaded: float,
    servers: dict[str, int],
) -> tuple[float, float, float | None, float, dict[str, float], float]:
    """(seconds from upload complete to all done, start-up seconds, p95 lag, peak RSS MB,
    CPU seconds per process from service ready to all done, the service's CPU seconds at
    ready: its start-up, every process of the pod)."""
    log = (workdir / "service.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest.cli.ingest", "run", "--host", "127.0.0.1", "--port",
         str(port), "--log-level", "WARNING", "--config", str(config)],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    poller = ReadyPoller(url)
    try:
        for _ in range(1200):
            if poller.ready():
                break
            if proc.poll() is not None:
                raise RuntimeError((workdir / "service.log").read_text())
            time.sleep(POLL_SECONDS)
        started = time.perf_counter() - t_uploaded
        pids = {"service": proc.pid, **servers}
        cpu0 = trees_cpu_seconds(pids)
        with DonePoller(dsn, "s3-main") as done:
            while done.count() < objects:
                if proc.poll() is not None:
                    raise RuntimeError((workdir / "service.log").read_text())
                time.sleep(POLL_SECONDS)
        elapsed = time.perf_counter() - t_uploaded
        cpu1 = trees_cpu_seconds(pids)
        cpu = {who: cpu1[who] - cpu0[who] for who in pids}
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        rss = peak_rss_mb(proc.pid)
    finally:
        poller.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    return elapsed, started, p95_from_histogram(metrics), rss, cpu, cpu0["service"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8, help="raw GET concurrency")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="the source's batch_size (default: the service's)",
    )
    ap.add_argument(
        "--cold-bytecode",
        action="store_true",
        help="do not compile the bytecode first (every start compiles)",
    )
    args = ap.parse_args()
    pg_url = shared_env()["INGEST_TEST_POSTGRES_URL"]
    run = uuid.uuid4().hex[:8]
    prefix = f"bench-s3-{run}/"
    workdir = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    schema, dsn = fresh_schema(pg_url, "bench_s3")
    redis = private_redis()
    try:
        print(
            f"machine: {platform.node()} {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, load average {os.getloadavg()}"
        )
        if not args.cold_bytecode:
            print(f"bytecode compiled (untimed) in {compile_bytecode():.1f}s")
        objs = make_objects(prefix, args.records, args.objects, run)
        mb = sum(len(b) for b in objs.values()) / 1e6
        config = files_config(
            workdir / "bench.yaml",
            redis_url=redis_with_db(redis.url, 0),
            postgres_url=dsn,
            sources=[
                s3_source(prefix, **({"batch_size": args.batch_size} if args.batch_size else {}))
            ],
        )
        env = service_env_for(workdir)
        servers = postgres_and_redis(redis.port)
        t_up = time.perf_counter()
        upload(objs, concurrency=8)
        t_uploaded, wall_uploaded = time.perf_counter(), time.time()
        print(f"uploaded {args.objects} objects, {mb:.0f} MB in {t_uploaded - t_up:.1f}s")
        elapsed, started, p95, rss, cpu, startup_cpu = run_service(
            config, env, workdir, args.port or free_port(), dsn, args.objects, t_uploaded, servers
        )
        print(f"  upload complete at {wall_uploaded:.3f} (wall clock: to line up with traces)")
        rows = sink_count(dsn)
        if rows != args.records:
            raise SystemExit(f"sink holds {rows} rows, expected {args.records}")
        nbytes, nlines, raw_s = asyncio.run(raw_get(list(objs), args.concurrency))
        copy_path = workdir / "rows.copy"
        n_copy = copy_file(list(objs.values()), copy_path)
        del objs
        # The sink's table, written just now, is due an insert-triggered autovacuum (a scan and
        # hint-bit write of every row, ~1 s of CPU at 1M) that would otherwise land inside the
        # timed \copy below and lower the limit. Done here, untimed, it has nothing left due.
        pg_execute(pg_url, f"VACUUM ANALYZE {schema}.entities")
        copy_s = psql_copy(pg_url, schema, copy_path)
        rate, raw_rate, copy_rate = args.records / elapsed, nlines / raw_s, n_copy / copy_s
        print(f"records:                 {args.records:,} in {args.objects} objects ({mb:.0f} MB)")
        print(
            f"pipeline (ingest run):   {rate:12,.0f} records/s  ({elapsed:.1f}s from upload"
            f" complete to all done; service ready after {started:.1f}s)"
        )
        print(
            f"  excluding start-up:    {args.records / (elapsed - started):12,.0f} records/s"
            f"  ({elapsed - started:.1f}s from service ready to all done)"
        )
        print(
            f"raw GET (aiobotocore):   {raw_rate:12,.0f} records/s  ({raw_s:.1f}s, "
            f"{nbytes / 1e6 / raw_s:.0f} MB/s, concurrency {args.concurrency})"
        )
        print(f"psql \\copy (same rows):  {copy_rate:12,.0f} records/s  ({copy_s:.1f}s)")
        ready_rate = args.records / (elapsed - started)
        print(f"ratio pipeline/raw GET:  {rate / raw_rate:.3f}")
        print(
            f"ratio pipeline/\\copy:    {rate / copy_rate:.3f}  (start-up included: the service is"
            " started after the upload; its imports, fork of workers, connections, first listing)"
        )
        print(
            f"  from service ready:    {ready_rate / copy_rate:.3f}  (start-up to /health/detailed"
            " answering left out; the workers' first listing and leases still in)"
        )
        print(f"p95 lag:                 <= {p95} s (ingest_lag_seconds bucket bound)")
        print(f"peak RSS (service):      {rss:.0f} MB (VmHWM)")
        shown = ", ".join(f"{who} {sec / args.records * 1e6:.1f}" for who, sec in cpu.items())
        print(f"CPU µs/record:           {shown} (service ready to all done)")
        print(
            f"service CPU seconds:     {startup_cpu:.2f} to ready (start-up, every process of"
            f" the pod), {startup_cpu + cpu['service']:.2f} to all done"
        )
        print(f"load average after:      {os.getloadavg()}")
    finally:
        redis.close()
        drop_schema(pg_url, schema)
        delete_prefix(prefix)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
