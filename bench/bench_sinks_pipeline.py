"""Per sink: records/s through the whole pipeline against that sink's raw bulk path, same run.

For each sink (postgres, neo4j, typesense), one at a time, on the same N records (customers
with two attributes and one KNOWS relation, as in bench/bench_sinks_raw.py):
  raw       the database's own bulk path from its driver alone, batches of 2000, one in flight:
            Postgres binary COPY (asyncpg) into a table of the sink's layout; Neo4j
            `UNWIND ... MERGE` of nodes and relationships (bench_sinks_raw.RAW_NEO4J);
            Typesense `documents/import?action=upsert` of the same documents
  pipeline  `ingest run` as a process in production mode (Redis idempotency/checkpoints,
            Postgres DLQ), only that sink configured, the tenant's token bucket opened wide
            (bench_embedded.BENCH_CONFIG): a JSON-lines file dropped into the inbox, timed
            until it is committed (moved to done/) — decode, validate, dedupe, revision-guarded
            write, claims, checkpoint
Prints records/s for both, the ratio pipeline/raw, p95 lag (ingest_lag_seconds histogram
bucket bound) and peak RSS (VmHWM) of the service process, and checks the sink holds N.

    uv run python bench/bench_sinks_pipeline.py [--records 100000] [--only neo4j]
Servers: scripts/services/up.sh postgres redis neo4j typesense (coordinates from the
INGEST_TEST_* environment, else from $INGEST_RUN_DIR/*.env).
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import orjson
import yaml
from neo4j import AsyncGraphDatabase

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_embedded import BENCH_CONFIG, p95_from_histogram, peak_rss_mb  # noqa: E402
from bench_sinks_raw import RAW_NEO4J, records  # noqa: E402

from ingest.records import Record  # noqa: E402
from ingest.sinks.postgres import PostgresSink  # noqa: E402
from tests.e2e._auth import detailed, service_env  # noqa: E402

RUN_DIR = Path(os.environ.get("INGEST_RUN_DIR", "/tmp/ingest-test-run"))
BATCH = 2000
REDIS_DB = 9
TS_FIELDS = {"customer": [{"name": "name", "type": "string"}, {"name": "score", "type": "int64"}]}


def coords() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("postgres", "redis", "neo4j", "typesense"):
        path = RUN_DIR / f"{name}.env"
        if path.exists():
            for line in path.read_text().splitlines():
                if line.startswith("export "):
                    k, _, v = line[7:].partition("=")
                    out[k] = v.strip("'\"")
    out.update({k: v for k, v in os.environ.items() if k.startswith("INGEST_TEST_")})
    return out


def batches(recs: list[Record]) -> list[list[Record]]:
    return [recs[i : i + BATCH] for i in range(0, len(recs), BATCH)]


# ---------------------------------------------------------------------- raw paths
async def raw_postgres(c: dict[str, str], recs: list[Record], dsn: str) -> float:
    """Binary COPY of exactly the rows the sink stores (PostgresSink.row_of / copy_raw) into a
    table of the sink's layout: no staging, no guard."""
    sink = PostgresSink("raw", dsn, "bench_raw", 60_000)
    await sink.start()
    try:
        t0 = time.perf_counter()
        for b in batches(recs):
            await sink.copy_raw([PostgresSink.row_of(r) for r in b])
        return len(recs) / (time.perf_counter() - t0)
    finally:
        await sink.close()


async def raw_neo4j(c: dict[str, str], recs: list[Record], tenant: str) -> float:
    driver = AsyncGraphDatabase.driver(
        c["INGEST_TEST_NEO4J_URI"],
        auth=(c["INGEST_TEST_NEO4J_USER"], c["INGEST_TEST_NEO4J_PASSWORD"]),
    )
    try:
        await driver.execute_query(
            "CREATE CONSTRAINT bench_raw_key IF NOT EXISTS FOR (n:BenchRaw) "
            "REQUIRE (n.tenant, n.entity_type, n.entity_id) IS UNIQUE"
        )
        t0 = time.perf_counter()
        for b in batches(recs):
            rows = [
                {
                    "tenant": r.tenant,
                    "entity_type": r.entity_type,
                    "entity_id": r.entity_id,
                    "props": {**r.body["attributes"], "revision": r.revision},
                    "rels": r.body["relations"],
                }
                for r in b
            ]
            await driver.execute_query(RAW_NEO4J, rows=rows)
        return len(recs) / (time.perf_counter() - t0)
    finally:
        await neo4j_delete(driver, "BenchRaw", tenant)
        await driver.close()


async def neo4j_delete(driver: Any, label: str, tenant: str) -> None:
    async with driver.session() as session:  # IN TRANSACTIONS needs an implicit transaction
        q = (
            f"MATCH (n:{label} {{tenant: $t}}) CALL (n) {{ DETACH DELETE n }} "
            "IN TRANSACTIONS OF 5000 ROWS"
        )
        await (await session.run(q, t=tenant)).consume()


async def raw_typesense(c: dict[str, str], recs: list[Record], tenant: str) -> float:
    coll = f"bench_raw_{tenant}"
    async with httpx.AsyncClient(
        base_url=c["INGEST_TEST_TYPESENSE_URL"],
        timeout=120,
        headers={"X-TYPESENSE-API-KEY": c["INGEST_TEST_TYPESENSE_API_KEY"]},
    ) as http:
        schema = {
            "name": coll,
            "fields": [
                {"name": "entity_id", "type": "string"},
                {"name": "revision", "type": "int64"},
                {"name": "deleted", "type": "bool"},
                {"name": "name", "type": "string", "optional": True},
                {"name": "score", "type": "int64", "optional": True},
            ],
        }
        (await http.post("/collections", json=schema)).raise_for_status()
        try:
            t0 = time.perf_counter()
            for b in batches(recs):
                body = b"\n".join(
                    orjson.dumps(
                        {
                            **r.body["attributes"],
                            "id": r.entity_id,
                            "entity_id": r.entity_id,
                            "revision": r.revision,
                            "deleted": False,
                        }
                    )
                    for r in b
                )
                resp = await http.post(
                    f"/collections/{coll}/documents/import",
                    params={"action": "upsert"},
                    content=body,
                )
                resp.raise_for_status()
            return len(recs) / (time.perf_counter() - t0)
        finally:
            await http.delete(f"/collections/{coll}")


# ---------------------------------------------------------------------- pipeline
def sink_config(sink: str, c: dict[str, str]) -> dict[str, Any]:
    if sink == "postgres":
        return {"type": "postgres", "name": "postgres", "table": "entities"}
    if sink == "neo4j":
        return {
            "type": "neo4j",
            "name": "neo4j",
            "uri": c["INGEST_TEST_NEO4J_URI"],
            "user": c["INGEST_TEST_NEO4J_USER"],
            "password": c["INGEST_TEST_NEO4J_PASSWORD"],
        }
    return {
        "type": "typesense",
        "name": "typesense",
        "url": c["INGEST_TEST_TYPESENSE_URL"],
        "api_key": c["INGEST_TEST_TYPESENSE_API_KEY"],
        "fields": TS_FIELDS,
        "timeout_seconds": 60,
    }


def run_pipeline(
    sink: str,
    c: dict[str, str],
    lines: Sequence[bytes],
    tenant: str,
    dsn: str,
    workdir: Path,
    port: int,
) -> tuple[float, float | None, float]:
    data = workdir / f"svc-{sink}"
    inbox = data / "inbox" / tenant
    inbox.mkdir(parents=True)
    redis_url = c["INGEST_TEST_REDIS_URL"].rsplit("/", 1)[0] + f"/{REDIS_DB}"
    cfg = {
        **yaml.safe_load(BENCH_CONFIG),
        "state": {"kind": "production", "redis_url": redis_url, "postgres_url": dsn},
        "sinks": [sink_config(sink, c)],
        "sources": [{"type": "inbox", "name": "inbox", "poll_seconds": 0.1}],
    }
    config = workdir / f"{sink}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "INGEST_DATA_DIR": str(data), **service_env(workdir)}
    log = open(workdir / f"{sink}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
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
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if detailed(url, 1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        staged = workdir / f"{sink}.jsonl"
        staged.write_bytes(b"\n".join(lines) + b"\n")
        t0 = time.perf_counter()
        os.replace(staged, inbox / "customers.jsonl")
        while (inbox / "customers.jsonl").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"service exited: {(workdir / f'{sink}.log').read_text()}")
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        log.close()
    return len(lines) / elapsed, p95_from_histogram(metrics), rss


async def sink_count(sink: str, c: dict[str, str], tenant: str, dsn: str) -> int:
    if sink == "postgres":
        conn = await asyncpg.connect(dsn)
        try:
            return int(
                await conn.fetchval("SELECT count(*) FROM entities WHERE tenant = $1", tenant)
            )
        finally:
            await conn.close()
    if sink == "neo4j":
        from ingest.sinks.neo4j import Neo4jSink

        n4 = Neo4jSink(
            "count",
            c["INGEST_TEST_NEO4J_URI"],
            c["INGEST_TEST_NEO4J_USER"],
            c["INGEST_TEST_NEO4J_PASSWORD"],
        )
        try:
            return await n4.count_nodes(tenant)
        finally:
            await n4.close()
    from ingest.sinks.typesense import TypesenseSink

    ts = TypesenseSink(
        "count", c["INGEST_TEST_TYPESENSE_URL"], c["INGEST_TEST_TYPESENSE_API_KEY"], {}
    )
    try:
        return await ts.count(tenant, "customer")
    finally:
        await ts.close()


async def cleanup(sink: str, c: dict[str, str], tenant: str) -> None:
    if sink == "neo4j":
        driver = AsyncGraphDatabase.driver(
            c["INGEST_TEST_NEO4J_URI"],
            auth=(c["INGEST_TEST_NEO4J_USER"], c["INGEST_TEST_NEO4J_PASSWORD"]),
        )
        try:
            await neo4j_delete(driver, "Entity", tenant)
            await neo4j_delete(driver, "Tombstone", tenant)
        finally:
            await driver.close()
    elif sink == "typesense":
        from ingest.sinks.typesense import collection_name

        async with httpx.AsyncClient(
            base_url=c["INGEST_TEST_TYPESENSE_URL"],
            headers={"X-TYPESENSE-API-KEY": c["INGEST_TEST_TYPESENSE_API_KEY"]},
        ) as http:
            await http.delete(f"/collections/{collection_name(tenant, 'customer')}")


async def pg_exec(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--only", choices=["postgres", "neo4j", "typesense"], action="append")
    ap.add_argument("--port", type=int, default=18097)
    args = ap.parse_args()
    c = coords()
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f} "
        f"{os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}"
    )
    print(f"records: {args.records}, raw batches of {BATCH}, one in flight")
    workdir = Path(tempfile.mkdtemp(prefix="bench-sinks-pipeline-"))
    try:
        for sink in args.only or ["postgres", "neo4j", "typesense"]:
            tenant = f"bench-{uuid.uuid4().hex[:8]}"
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            pg_url = c["INGEST_TEST_POSTGRES_URL"]
            asyncio.run(pg_exec(pg_url, f"CREATE SCHEMA {schema}"))
            dsn = f"{pg_url}{'&' if '?' in pg_url else '?'}search_path={schema}"
            recs = records(tenant, args.records)
            lines = [orjson.dumps(r.body) for r in recs]
            try:
                if sink == "postgres":
                    raw = asyncio.run(raw_postgres(c, recs, dsn))
                elif sink == "neo4j":
                    raw = asyncio.run(raw_neo4j(c, recs, tenant))
                else:
                    raw = asyncio.run(raw_typesense(c, recs, tenant))
                rate, p95, rss = run_pipeline(sink, c, lines, tenant, dsn, workdir, args.port)
                held = asyncio.run(sink_count(sink, c, tenant, dsn))
                assert held == args.records, f"{sink} holds {held}, expected {args.records}"
            finally:
                asyncio.run(cleanup(sink, c, tenant))
                asyncio.run(pg_exec(pg_url, f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            print(
                f"{sink:9s} raw {raw:9,.0f} rec/s   pipeline {rate:9,.0f} rec/s   "
                f"ratio {rate / raw:.2f}   p95 lag <= {p95} s   peak RSS {rss:.0f} MB   "
                f"(sink holds {held})",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    la = os.getloadavg()
    print(f"load average after: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")


if __name__ == "__main__":
    main()
