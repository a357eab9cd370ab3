"""S3 -> Postgres benchmark: N records (default 1M) in M objects (default 200), end to end.

Measured in one run, on the same objects, rows and table layout:
  pipeline  `ingest run` as a process in production mode (Redis + Postgres state, Postgres
            sink, one S3 source; tenant token bucket opened wide as in bench_embedded.py).
            Headline, as bench_kafka.py measures (and bench_postgres.py / bench_embedded.py,
            whose files land in a running service's inbox): a WARM service drains a backlog.
            The service is started on an empty bucket prefix, waits until every worker has
            listed it once (its S3 client made), is paused (`POST /admin/pause`: every worker's
            source held, nothing listed, leased or fetched), the objects are uploaded, and the
            clock runs from `POST /admin/resume` to every object done in the lease table. Before
            the resume the bench checks that nothing was leased nor written (the rate is over
            exactly the N records), so the figure is the pipeline's, as `\\copy` and raw GET
            time theirs, without the pod's start-up (imports, fork of the workers, connections:
            ~1.2-1.6 s, about a `\\copy` of 200k rows).
  cold start the older measure, kept (`--phase cold`, or both with the default `--phase both`):
            the service is started AFTER the upload of other objects (same sizes) and timed from
            upload complete to all done, so its start-up is inside the time; a second line gives
            the rate from service ready.
  raw GET   the same objects fetched with aiobotocore (concurrency 8), bytes only: S3's limit
  \\copy     `psql \\copy` of exactly the rows the sink stores into a table of the same layout
            (columns, key, check, fillfactor): Postgres's bulk-load limit
Prints records/s for each, the ratios, p95 lag (ingest_lag_seconds histogram; event time is the
object's LastModified, so objects queued behind others count their wait, and in the warm phase
the objects' wait for the resume as well), peak RSS (VmHWM) of the service, and CPU µs per
record (user + system) of the service's process tree, the bench's Postgres and its private Redis
over the timed part (warm: from resume; cold: from service ready). Needs
`scripts/services/up.sh seaweedfs postgres redis`; starts a private Redis (so idempotency keys
do not land in the shared one) and uses a fresh Postgres schema and a fresh bucket prefix per
phase, all removed afterwards.

    uv run python bench/bench_s3.py [--records 1000000] [--objects 200] [--phase both|warm|cold]
        [--cold-bytecode]

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
from dataclasses import dataclass
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


@dataclass
class Phase:
    """One measure's own objects, schema (state + sink), Redis db and service directory."""

    name: str
    prefix: str
    objs: dict[str, bytes]
    schema: str
    dsn: str
    config: Path
    env: dict[str, str]
    workdir: Path


@dataclass
class Result:
    elapsed: float  # seconds timed (warm: resume to all done; cold: upload complete to all done)
    started: float  # cold: seconds from upload complete to service ready; warm: 0
    p95: float | None
    rss: float
    cpu: dict[str, float]  # CPU seconds per process over the timed part (cold: from ready)
    startup_cpu: float  # the service's CPU seconds to ready (every process of the pod)
    held: float = 0.0  # warm: seconds the uploaded objects waited for the resume


class Service:
    """`ingest run` as a process, its readiness asked over one kept-open client."""

    def __init__(self, phase: Phase, port: int) -> None:
        self.log_path = phase.workdir / "service.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingest.cli.ingest", "run", "--host", "127.0.0.1", "--port",
             str(port), "--log-level", "WARNING", "--config", str(phase.config)],
            cwd=phase.workdir, env=phase.env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        self.poller = ReadyPoller(self.url)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(self.log_path.read_text())

    def wait_ready(self) -> None:
        for _ in range(1200):
            if self.poller.ready():
                return
            self.check()
            time.sleep(POLL_SECONDS)
        raise RuntimeError("the service did not answer /health/detailed")

    def statuses(self, source: str) -> list[str]:
        """The status of `source` in every worker (a pod's health lists them under `workers`)."""
        doc = httpx.get(f"{self.url}/health/detailed", headers=bearer(), timeout=10).json()
        adapter = doc["adapters"][source]
        workers = adapter.get("workers")
        return [w["status"] for w in workers.values()] if workers else [adapter["status"]]

    def wait_status(self, source: str, wanted: set[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not set(got := self.statuses(source)) <= wanted:
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{source}: workers {got}, waited for {sorted(wanted)}")
            time.sleep(0.1)

    def admin(self, action: str) -> None:
        httpx.post(f"{self.url}/admin/{action}", headers=bearer(), timeout=30).raise_for_status()

    def stop(self) -> tuple[str, float]:
        """SIGTERM and wait; (its /metrics, its peak RSS in MB), read before the stop."""
        try:
            metrics = httpx.get(f"{self.url}/metrics", timeout=10).text
            rss = peak_rss_mb(self.proc.pid)
        finally:
            self.poller.close()
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
            self._log.close()
        return metrics, rss


def wait_done(service: Service, dsn: str, objects: int) -> None:
    with DonePoller(dsn, SOURCE) as done:
        while done.count() < objects:
            service.check()
            time.sleep(POLL_SECONDS)


HOLD_CHECK_SECONDS = 1.0  # after the upload, paused: > 2 polls (0.5 s) of an unheld source


def run_warm(phase: Phase, port: int, servers: dict[str, int]) -> Result:
    """Start on the empty prefix, pause, upload, resume: timed from the resume (see the module
    docstring). Raises if anything was leased or written before the resume."""
    service = Service(phase, port)
    try:
        service.wait_ready()
        service.wait_status(SOURCE, {"idle"})  # every worker listed the empty prefix once
        service.admin("pause")
        service.wait_status(SOURCE, {"paused"})  # every worker's source held
        t_up = time.perf_counter()
        upload(phase.objs, concurrency=8)
        t_uploaded = time.perf_counter()
        mb = sum(len(b) for b in phase.objs.values()) / 1e6
        print(f"  warm: uploaded {len(phase.objs)} objects, {mb:.0f} MB in {t_uploaded - t_up:.1f}s"
              " while paused")  # fmt: skip
        time.sleep(HOLD_CHECK_SECONDS)
        (leased,) = pg_query(
            phase.dsn, f"SELECT count(*) FROM ingest_source_leases WHERE source = '{SOURCE}'"
        )[0]
        if leased or sink_count(phase.dsn):
            raise SystemExit(
                f"pause did not hold the S3 source: {leased} objects leased,"
                f" {sink_count(phase.dsn)} rows written before the resume"
            )
        pids = {"service": service.proc.pid, **servers}
        cpu0 = trees_cpu_seconds(pids)
        t0, wall0 = time.perf_counter(), time.time()
        service.admin("resume")
        answered = time.perf_counter() - t0
        wait_done(service, phase.dsn, len(phase.objs))
        elapsed = time.perf_counter() - t0
        cpu1 = trees_cpu_seconds(pids)
        print(f"  warm: timed from resume at {wall0:.3f} (wall clock: to line up with traces);"
              f" the resume answered after {answered:.3f}s")  # fmt: skip
    finally:
        metrics, rss = service.stop()
    cpu = {who: cpu1[who] - cpu0[who] for who in pids}
    return Result(elapsed, 0.0, p95_from_histogram(metrics), rss, cpu, cpu0["service"],
                  held=t0 - t_uploaded)  # fmt: skip


def run_cold(phase: Phase, port: int, servers: dict[str, int]) -> Result:
    """Upload, then start the service: timed from upload complete, start-up inside."""
    t_up = time.perf_counter()
    upload(phase.objs, concurrency=8)
    t_uploaded, wall_uploaded = time.perf_counter(), time.time()
    mb = sum(len(b) for b in phase.objs.values()) / 1e6
    print(f"  cold: uploaded {len(phase.objs)} objects, {mb:.0f} MB in {t_uploaded - t_up:.1f}s")
    service = Service(phase, port)
    try:
        service.wait_ready()
        started = time.perf_counter() - t_uploaded
        pids = {"service": service.proc.pid, **servers}
        cpu0 = trees_cpu_seconds(pids)
        wait_done(service, phase.dsn, len(phase.objs))
        elapsed = time.perf_counter() - t_uploaded
        cpu1 = trees_cpu_seconds(pids)
        print(f"  cold: upload complete at {wall_uploaded:.3f} (wall clock: to line up with"
              " traces)")  # fmt: skip
    finally:
        metrics, rss = service.stop()
    cpu = {who: cpu1[who] - cpu0[who] for who in pids}
    return Result(elapsed, started, p95_from_histogram(metrics), rss, cpu, cpu0["service"])


SOURCE = "s3-main"


def make_phase(
    name: str, pg_url: str, redis_url: str, records: int, objects: int, batch_size: int | None,
    root: Path,
) -> Phase:  # fmt: skip
    run = uuid.uuid4().hex[:8]
    prefix = f"bench-s3-{run}/"
    workdir = root / name
    workdir.mkdir()
    schema, dsn = fresh_schema(pg_url, "bench_s3")
    config = files_config(
        workdir / "bench.yaml",
        redis_url=redis_url,
        postgres_url=dsn,
        sources=[s3_source(prefix, **({"batch_size": batch_size} if batch_size else {}))],
    )
    objs = make_objects(prefix, records, objects, run)
    return Phase(name, prefix, objs, schema, dsn, config, service_env_for(workdir), workdir)


def report(name: str, res: Result, records: int, copy_rate: float, raw_rate: float) -> None:
    rate = records / res.elapsed
    if name == "warm":
        print(
            f"pipeline, warm (headline): {rate:10,.0f} records/s  ({res.elapsed:.2f}s from"
            f" resume to all done) = {rate / copy_rate:.3f}x \\copy, {rate / raw_rate:.3f}x raw GET"
        )
    else:
        ready_rate = records / (res.elapsed - res.started)
        print(
            f"pipeline, cold start:      {rate:10,.0f} records/s  ({res.elapsed:.2f}s from upload"
            f" complete to all done; service ready after {res.started:.2f}s) ="
            f" {rate / copy_rate:.3f}x \\copy (start-up included: imports, fork of workers,"
            " connections, first listing)"
        )
        print(
            f"  cold, from ready:        {ready_rate:10,.0f} records/s"
            f"  ({res.elapsed - res.started:.2f}s)"
            f" = {ready_rate / copy_rate:.3f}x \\copy (the workers' first listing and leases in)"
        )
    lag = f"<= {res.p95} s (ingest_lag_seconds bucket bound)"
    if name == "warm":
        lag += f"; the objects waited {res.held:.1f}s paused before the resume"
    print(f"  p95 lag:                 {lag}")
    shown = ", ".join(f"{who} {sec / records * 1e6:.1f}" for who, sec in res.cpu.items())
    since = "resume" if name == "warm" else "service ready"
    print(f"  CPU µs/record:           {shown} ({since} to all done)")
    to_done = res.startup_cpu + res.cpu["service"]
    print(
        f"  service:                 peak RSS {res.rss:.0f} MB (VmHWM); CPU {res.startup_cpu:.2f}s"
        f" to ready (start-up, every process of the pod), {to_done:.2f}s to all done"
        + (" (the warm wait and the paused upload included)" if name == "warm" else "")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8, help="raw GET concurrency")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument(
        "--phase",
        choices=("both", "warm", "cold"),
        default="both",
        help="warm: from resume (headline); cold: start-up included; both (default): warm first",
    )
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
    root = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    redis = private_redis()
    names = ["warm", "cold"] if args.phase == "both" else [args.phase]
    phases: list[Phase] = []
    try:
        print(
            f"machine: {platform.node()} {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, load average {os.getloadavg()}"
        )
        if not args.cold_bytecode:
            print(f"bytecode compiled (untimed) in {compile_bytecode():.1f}s")
        servers = postgres_and_redis(redis.port)
        results: dict[str, Result] = {}
        for db, name in enumerate(names):  # each its own Redis db: no checkpoint shared
            phase = make_phase(name, pg_url, redis_with_db(redis.url, db), args.records,
                               args.objects, args.batch_size, root)  # fmt: skip
            phases.append(phase)
            run = run_warm if name == "warm" else run_cold
            results[name] = run(phase, args.port or free_port(), servers)
            rows = sink_count(phase.dsn)
            if rows != args.records:
                raise SystemExit(f"{name}: the sink holds {rows} rows, expected {args.records}")
        first = phases[0]
        nbytes, nlines, raw_s = asyncio.run(raw_get(list(first.objs), args.concurrency))
        copy_path = root / "rows.copy"
        n_copy = copy_file(list(first.objs.values()), copy_path)
        for phase in phases:
            phase.objs = {}
        # The sink's table, written just now, is due an insert-triggered autovacuum (a scan and
        # hint-bit write of every row, ~1 s of CPU at 1M) that would otherwise land inside the
        # timed \copy below and lower the limit. Done here, untimed, it has nothing left due.
        for phase in phases:
            pg_execute(pg_url, f"VACUUM ANALYZE {phase.schema}.entities")
        copy_s = psql_copy(pg_url, first.schema, copy_path)
        raw_rate, copy_rate = nlines / raw_s, n_copy / copy_s
        mb = nbytes / 1e6
        print(f"records:                   {args.records:,} in {args.objects} objects "
              f"({mb:.0f} MB)")  # fmt: skip
        print(
            f"raw GET (aiobotocore):     {raw_rate:10,.0f} records/s  ({raw_s:.1f}s, "
            f"{mb / raw_s:.0f} MB/s, concurrency {args.concurrency})"
        )
        print(f"psql \\copy (same rows):    {copy_rate:10,.0f} records/s  ({copy_s:.2f}s)")
        for name, res in results.items():
            report(name, res, args.records, copy_rate, raw_rate)
        print(f"load average after:        {os.getloadavg()}")
    finally:
        redis.close()
        for phase in phases:
            drop_schema(pg_url, phase.schema)
            delete_prefix(phase.prefix)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
