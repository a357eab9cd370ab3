"""Raw S3 GET throughput (the physical limit for the S3 source) against S3Source on the same data.

    source $INGEST_RUN_DIR/seaweedfs.env
    uv run python bench/bench_s3_raw.py [--objects 40] [--mb 8] [--concurrency 8]

Uploads N objects of JSON lines under a fresh prefix, then measures:
  raw:    concurrent GETs with aiobotocore, bytes only (plus a newline count for records/s)
  source: S3Source reading the same objects to RawRecords, committing every batch
and prints MB/s, records/s and the source/raw ratio. The prefix is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

from ingest.config import S3SourceConfig
from ingest.sources.s3 import S3Source
from ingest.state.leases import SQLiteLeaseStore
from ingest.state.sqlite import SQLiteCheckpointStore, SQLiteDB

BUCKET = "ingest-bucket"


def _body(obj: int, size: int) -> bytes:
    pad = b"y" * 120
    lines, n, total = [], 0, 0
    while total < size:
        line = b'{"id":"b%d-%d","tenant_id":"acme","revision":1,"pad":"%s"}\n' % (obj, n, pad)
        lines.append(line)
        total += len(line)
        n += 1
    return b"".join(lines)


async def _raw(s3: Any, keys: list[str], concurrency: int) -> tuple[int, int, float]:
    sem = asyncio.Semaphore(concurrency)
    nbytes = nlines = 0

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


async def _source(endpoint: str, prefix: str, expected: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        db = await SQLiteDB.open(Path(tmp) / "state.db")
        cfg = S3SourceConfig(
            name="bench", url=f"s3://{BUCKET}/{prefix}", tenant="acme", endpoint_url=endpoint
        )
        source = S3Source(
            cfg, SQLiteCheckpointStore(db, "bench"), SQLiteLeaseStore(db), worker_id="bench"
        )
        await source.start()
        seen = 0
        t0 = time.perf_counter()
        async for batch in source.batches():
            await source.commit(batch)
            seen += len(batch.records)
            if seen >= expected:
                break
        elapsed = time.perf_counter() - t0
        await source.close()
        await db.close()
    return seen, elapsed


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=40)
    ap.add_argument("--mb", type=float, default=8.0, help="size of each object")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    endpoint = os.environ.get("INGEST_TEST_S3_ENDPOINT")
    if not endpoint:
        sys.exit(
            "INGEST_TEST_S3_ENDPOINT not set: run scripts/services/seaweedfs.sh start and "
            "source $INGEST_RUN_DIR/seaweedfs.env"
        )
    prefix = f"bench-{uuid.uuid4().hex[:8]}/"
    keys = [f"{prefix}{i:04d}.jsonl" for i in range(args.objects)]
    async with get_session().create_client("s3", endpoint_url=endpoint) as s3:
        body = [_body(i, int(args.mb * (1 << 20))) for i in range(min(args.objects, 4))]
        sem = asyncio.Semaphore(8)

        async def put(i: int, key: str) -> None:
            async with sem:
                await s3.put_object(Bucket=BUCKET, Key=key, Body=body[i % len(body)])

        await asyncio.gather(*(put(i, k) for i, k in enumerate(keys)))
        try:
            nbytes, nlines, raw_s = await _raw(s3, keys, args.concurrency)
            seen, src_s = await _source(endpoint, prefix, nlines)
            # Same again with the collector tuned as a service would (gen-0 passes over the
            # records in flight dominate otherwise): freeze startup objects, rarer gen-0 runs.
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 20)
            seen_gc, gc_s = await _source(endpoint, prefix, nlines)
            gc.set_threshold(700, 10, 10)
            gc.unfreeze()
        finally:
            for key in keys:
                await s3.delete_object(Bucket=BUCKET, Key=key)
    mb = nbytes / 1e6
    print(f"objects={args.objects} size={mb:.0f} MB records={nlines:,}")
    print(
        f"raw GET   : {mb / raw_s:8.1f} MB/s {nlines / raw_s:12,.0f} records/s"
        f"  ({raw_s:.2f}s, concurrency {args.concurrency})"
    )
    print(
        f"S3Source  : {mb / src_s:8.1f} MB/s {seen / src_s:12,.0f} records/s  ({src_s:.2f}s,"
        " one worker, commit per batch)"
    )
    print(
        f"S3Source gc: {mb / gc_s:7.1f} MB/s {seen_gc / gc_s:12,.0f} records/s  ({gc_s:.2f}s,"
        " gc.freeze + set_threshold(50000, 20, 20))"
    )
    print(f"ratio source/raw: {raw_s / src_s:.3f} (default gc), {raw_s / gc_s:.3f} (tuned gc)")


if __name__ == "__main__":
    asyncio.run(main())
