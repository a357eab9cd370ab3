"""Sink overhead against the raw write path, on the same N records and batch size.

Neo4j: `UNWIND ... MERGE` of nodes, props and one relationship per record from the driver
alone, vs Neo4jSink.write() (which adds the in-transaction revision guard and tombstone
checks). Typesense: `import` (action=upsert) of the same documents over plain HTTP, vs
TypesenseSink.write() (which first reads the stored revisions). Prints records/s for each
and the ratio sink/raw: the price of the guard.

    source $INGEST_RUN_DIR/all.env && uv run python bench/bench_sinks_raw.py --records 100000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import httpx
import orjson
from neo4j import AsyncGraphDatabase

from ingest.config import TypesenseField
from ingest.records import RawRecord, Record, dedupe_key
from ingest.sinks.neo4j import Neo4jSink
from ingest.sinks.typesense import TypesenseSink, collection_name

FIELDS = {"customer": [TypesenseField(name="name"), TypesenseField(name="score", type="int64")]}

RAW_NEO4J = """
UNWIND $rows AS row
MERGE (n:BenchRaw {tenant: row.tenant, entity_type: row.entity_type, entity_id: row.entity_id})
SET n += row.props
WITH n, row
UNWIND row.rels AS rel
MERGE (m:BenchRaw {tenant: row.tenant, entity_type: rel.target_type, entity_id: rel.target_id})
MERGE (n)-[:KNOWS]->(m)
"""


def records(tenant: str, n: int) -> list[Record]:
    out = []
    for i in range(n):
        body = {
            "schema_version": 3, "tenant_id": tenant, "entity_type": "customer",
            "entity_id": f"c{i}", "revision": 1, "occurred_at": "2025-01-01T00:00:00Z",
            "priority": "normal", "attributes": {"name": f"name {i}", "score": i},
            "relations": [
                {"type": "KNOWS", "target_type": "customer", "target_id": f"c{(i + 1) % n}"}
            ],
            "deleted": False,
        }  # fmt: skip
        raw = RawRecord(data=b"", tenant=tenant, source="s", seq=i, position=None, event_time=0.0)
        out.append(Record.of(raw, body, dedupe_key(body)))
    return out


async def timed(
    batches: Sequence[Sequence[Record]], fn: Callable[[Sequence[Record]], Awaitable[object]]
) -> float:
    t0 = time.perf_counter()
    for b in batches:
        await fn(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


async def bench_neo4j(
    recs: list[Record], batches: list[list[Record]], tenant: str
) -> tuple[float, float]:
    uri, user, pw = (os.environ[f"INGEST_TEST_NEO4J_{k}"] for k in ("URI", "USER", "PASSWORD"))
    driver = AsyncGraphDatabase.driver(uri, auth=(user, pw))
    await driver.execute_query(
        "CREATE CONSTRAINT bench_raw_key IF NOT EXISTS FOR (n:BenchRaw) "
        "REQUIRE (n.tenant, n.entity_type, n.entity_id) IS UNIQUE"
    )

    async def raw(batch: Sequence[Record]) -> None:
        rows = [
            {"tenant": r.tenant, "entity_type": r.entity_type, "entity_id": r.entity_id,
             "props": {**r.body["attributes"], "revision": r.revision},
             "rels": r.body["relations"]}
            for r in batch
        ]  # fmt: skip
        await driver.execute_query(RAW_NEO4J, rows=rows)

    sink = Neo4jSink("bench", uri, user, pw)
    await sink.start()
    try:
        raw_rate = await timed(batches, raw)
        sink_rate = await timed(batches, sink.write)
        assert await sink.count_nodes(tenant) == len(recs)
    finally:
        async with driver.session() as session:  # IN TRANSACTIONS needs an implicit tx
            for label in ("BenchRaw", "Entity"):
                q = f"MATCH (n:{label} {{tenant: $t}}) CALL (n) {{ DETACH DELETE n }} "
                q += "IN TRANSACTIONS OF 5000 ROWS"
                await (await session.run(q, t=tenant)).consume()  # type: ignore[arg-type]
        await sink.close()
        await driver.close()
    return raw_rate, sink_rate


async def bench_typesense(
    recs: list[Record], batches: list[list[Record]], tenant: str
) -> tuple[float, float]:
    url, key = os.environ["INGEST_TEST_TYPESENSE_URL"], os.environ["INGEST_TEST_TYPESENSE_API_KEY"]
    raw_coll = f"bench_raw_{tenant}"
    async with httpx.AsyncClient(
        base_url=url, headers={"X-TYPESENSE-API-KEY": key}, timeout=60
    ) as http:
        schema = {"name": raw_coll, "fields": [
            {"name": "entity_id", "type": "string"}, {"name": "revision", "type": "int64"},
            {"name": "deleted", "type": "bool"},
            {"name": "name", "type": "string", "optional": True},
            {"name": "score", "type": "int64", "optional": True}]}  # fmt: skip
        (await http.post("/collections", json=schema)).raise_for_status()

        async def raw(batch: Sequence[Record]) -> None:
            body = b"\n".join(
                orjson.dumps({**r.body["attributes"], "id": r.entity_id, "entity_id": r.entity_id,
                              "revision": r.revision, "deleted": False})
                for r in batch
            )  # fmt: skip
            resp = await http.post(f"/collections/{raw_coll}/documents/import",
                                   params={"action": "upsert"}, content=body)  # fmt: skip
            resp.raise_for_status()

        sink = TypesenseSink("bench", url, key, FIELDS, timeout_seconds=60)
        await sink.start()
        try:
            raw_rate = await timed(batches, raw)
            sink_rate = await timed(batches, sink.write)
            assert await sink.count(tenant, "customer") == len(recs)
        finally:
            await sink.close()
            for coll in (raw_coll, collection_name(tenant, "customer")):
                await http.delete(f"/collections/{coll}")
    return raw_rate, sink_rate


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--only", choices=["neo4j", "typesense"])
    args = ap.parse_args()
    tenant = f"bench{uuid.uuid4().hex[:8]}"
    recs = records(tenant, args.records)
    batches = [recs[i : i + args.batch] for i in range(0, len(recs), args.batch)]
    print(f"{args.records} records, batches of {args.batch}, one batch in flight")
    for name, fn in (("neo4j", bench_neo4j), ("typesense", bench_typesense)):
        if args.only in (None, name):
            raw_rate, sink_rate = await fn(recs, batches, tenant)
            print(f"{name:9s} raw {raw_rate:9,.0f} rec/s   sink.write {sink_rate:9,.0f} rec/s"
                  f"   ratio sink/raw {sink_rate / raw_rate:.2f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
