"""Postgres sink write alone: `PostgresSink.write` of N decoded records in batches, no service.

What `bench_postgres.py` cannot separate: the sink's own cost per record, on the client (row
building, asyncpg encoding) and on the server (the postmaster tree: backends, WAL writer,
autovacuum), for three phases on the same entities:
  new      revision 1 of every entity (all new: the straight COPY path)
  update   revision 2 (the staged upsert; HOT updates with the table's fillfactor)
  replay   revision 2 again (every record UNCHANGED)
The limit is `PostgresSink.copy_raw` (binary COPY of `row_of` rows) of the same rows into a
fresh table of the same DDL, in the same run. Prints records/s, ratio to the limit, p95
batch latency, the batches per path (straight COPY / fallback / upsert), peak RSS and CPU
µs/record (client, server). Needs the Postgres of `scripts/services/up.sh postgres`
(its postmaster.pid in $INGEST_RUN_DIR for the server's CPU).

    uv run python bench/bench_postgres_sink.py [--records 200000] [--batch-size 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_embedded import make_lines, peak_rss_mb, tree_cpu_seconds  # noqa: E402

from ingest.pipeline.decode import Decoder  # noqa: E402
from ingest.records import RawRecord, Record  # noqa: E402
from ingest.sinks.postgres import PostgresSink  # noqa: E402
from tests.e2e._production import drop_schema, fresh_schema, shared_env  # noqa: E402


def records(n: int, revision: int) -> list[Record]:
    raws = [
        RawRecord(data=ln, tenant="acme-corp", source="inbox", seq=i, position=None, event_time=0.0)
        for i, ln in enumerate(make_lines(n, revision))
    ]
    return [r for r in Decoder().decode_many(raws) if isinstance(r, Record)]


def postmaster() -> int | None:
    pidfile = (
        Path(os.environ.get("INGEST_RUN_DIR", "/nonexistent")) / "postgres/data/postmaster.pid"
    )
    return int(pidfile.read_text().split()[0]) if pidfile.exists() else None


async def phase(
    sink: PostgresSink, recs: list[Record], batch: int, pg: int | None
) -> tuple[float, float, float, float | None]:
    """(records/s, p95 batch seconds, client µs/record, server µs/record)."""
    lat = []
    c0, s0, t0 = time.process_time(), tree_cpu_seconds(pg) if pg else 0.0, time.perf_counter()
    for i in range(0, len(recs), batch):
        b0 = time.perf_counter()
        await sink.write(recs[i : i + batch])
        lat.append(time.perf_counter() - b0)
    wall = time.perf_counter() - t0
    client = (time.process_time() - c0) / len(recs) * 1e6
    server = (tree_cpu_seconds(pg) - s0) / len(recs) * 1e6 if pg else None
    lat.sort()
    return len(recs) / wall, lat[int(0.95 * (len(lat) - 1))], client, server


async def run(dsn: str, n: int, batch: int) -> None:
    pg = postmaster()
    new, upd = records(n, 1), records(n, 2)
    limit = PostgresSink("limit", dsn, table="limit_entities")
    await limit.start()
    rows = [PostgresSink.row_of(r) for r in new]
    s0 = tree_cpu_seconds(pg) if pg else 0.0
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        await limit.copy_raw(rows[i : i + batch])
    limit_rate = n / (time.perf_counter() - t0)
    limit_server = (tree_cpu_seconds(pg) - s0) / n * 1e6 if pg else None
    await limit.close()
    print(f"records: {n}, batch {batch}")
    shown = "" if limit_server is None else f", server {limit_server:.1f} µs/record"
    print(f"limit (binary COPY of row_of rows): {limit_rate:,.0f} records/s{shown}")
    sink = PostgresSink("pg", dsn)
    await sink.start()
    try:
        for name, recs in (("new", new), ("update", upd), ("replay", upd)):
            before = dict(sink.paths)
            rate, p95, client, server = await phase(sink, recs, batch, pg)
            paths = {k: sink.paths[k] - before[k] for k in before}
            cpu = f"client {client:.1f}" + ("" if server is None else f", server {server:.1f}")
            print(
                f"{name:7s} {rate:9,.0f} records/s ({rate / limit_rate:.2f}x of limit), "
                f"p95 batch {p95 * 1000:.0f} ms, CPU µs/record {cpu}, batches {paths}"
            )
    finally:
        await sink.close()
    print(f"peak RSS (this process): {peak_rss_mb(os.getpid()):.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=2_000)
    args = ap.parse_args()
    print(f"machine: {platform.node()} {os.cpu_count()} cores, load average {os.getloadavg()}")
    url = shared_env()["INGEST_TEST_POSTGRES_URL"]
    schema, dsn = fresh_schema(url, "bench_pgsink")
    try:
        asyncio.run(run(dsn, args.records, args.batch_size))
    finally:
        drop_schema(url, schema)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
