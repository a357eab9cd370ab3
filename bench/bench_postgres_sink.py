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

`--against-on-conflict`: instead, the sink against the staged upsert before update-first (one
`INSERT ... ON CONFLICT DO UPDATE`, default planner settings: the reference statement of
tests/integration/test_postgres_copy_path.py) on two tables of the same rows, their batches
alternated (both upsert-only), for rounds of revision updates, a replay and older revisions:
server CPU (postmaster tree) and WAL bytes per record of each, outcomes checked equal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_embedded import make_lines, peak_rss_mb, tree_cpu_seconds  # noqa: E402

from ingest.pipeline.decode import Decoder  # noqa: E402
from ingest.records import RawRecord, Record  # noqa: E402
from ingest.sinks.postgres import PostgresSink  # noqa: E402
from tests.e2e._production import drop_schema, fresh_schema, shared_env  # noqa: E402

ROUNDS = ((2, "update"), (2, "replay"), (1, "older"), (3, "update"))


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


async def against_on_conflict(dsn: str, n: int, batch: int) -> None:
    import asyncpg  # type: ignore[import-untyped]

    import ingest.sinks.postgres as pgsink
    from tests.integration.test_postgres_copy_path import on_conflict_only

    pg = postmaster()
    if pg is None:
        raise SystemExit("needs the postmaster.pid of scripts/services/up.sh postgres")
    plain = PostgresSink("plain", dsn, table="plain_entities")
    settings = pgsink._SETTINGS
    pgsink._SETTINGS = {}  # the reference ran with the server's planner settings
    try:
        await plain.start()
    finally:
        pgsink._SETTINGS = settings
    sinks = {"update-first": PostgresSink("new", dsn), "on-conflict": on_conflict_only(plain)}
    for sink in sinks.values():
        if sink is not plain:
            await sink.start()
        copied = records(n, 1)
        for i in range(0, n, batch):
            await sink.write(copied[i : i + batch])
        sink.copy_skip = 10**9
    conn = await asyncpg.connect(dsn)
    print(f"records: {n}, batch {batch}; CPU µs/record of the server, WAL bytes/record")
    try:
        for revision, name in ROUNDS:
            recs = records(n, revision)
            cpu, wal = dict.fromkeys(sinks, 0.0), dict.fromkeys(sinks, 0)
            outcomes: dict[str, list[Any]] = {k: [] for k in sinks}
            for i in range(0, n, batch):
                turn = list(sinks) if i // batch % 2 == 0 else list(sinks)[::-1]
                for k in turn:
                    lsn0 = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
                    c0 = tree_cpu_seconds(pg)
                    got = await sinks[k].write(recs[i : i + batch])
                    cpu[k] += tree_cpu_seconds(pg) - c0
                    wal[k] += await conn.fetchval(
                        "SELECT pg_current_wal_insert_lsn() - $1::pg_lsn", lsn0
                    )
                    outcomes[k] += [(r.status, r.reason) for r in got]
            assert outcomes["update-first"] == outcomes["on-conflict"]
            shown = ", ".join(
                f"{k} {cpu[k] / n * 1e6:.1f} µs {float(wal[k]) / n:.0f} B" for k in sinks
            )
            print(f"rev {revision} {name:7s} {shown}  (load {os.getloadavg()[0]:.1f})")
    finally:
        await conn.close()
        for sink in sinks.values():
            await sink.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=2_000)
    ap.add_argument("--against-on-conflict", action="store_true")
    args = ap.parse_args()
    print(f"machine: {platform.node()} {os.cpu_count()} cores, load average {os.getloadavg()}")
    url = shared_env()["INGEST_TEST_POSTGRES_URL"]
    schema, dsn = fresh_schema(url, "bench_pgsink")
    try:
        go = against_on_conflict if args.against_on_conflict else run
        asyncio.run(go(dsn, args.records, args.batch_size))
    finally:
        drop_schema(url, schema)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
