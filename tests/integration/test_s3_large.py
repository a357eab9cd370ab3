"""A 1 GiB object streams through S3Source with bounded memory (RSS grows < 128 MiB).

The object is generated on the fly as a multipart upload (32 parts of 32 MiB of JSON lines),
so neither the test nor the source ever holds it whole. Runs alone in about a minute.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

from ingest.sources.s3 import S3Source
from tests.integration._fixtures_files import (
    BUCKET,
    Pump,
    State,
    s3_config,
)

pytestmark = pytest.mark.integration

PART = 32 << 20
PARTS = 32  # 1 GiB
PAD = b"x" * 4000
READ_GROWTH_LIMIT = 128 << 20


def _part(n: int, first_id: int) -> tuple[bytes, int]:
    """At least PART bytes of whole lines, ids from first_id; returns the bytes and the count."""
    line_len = len(b'{"id":"L-%d","p":%d,"pad":"%s"}\n' % (first_id, n, PAD))
    count = -(-PART // line_len)
    body = b"".join(
        b'{"id":"L-%d","p":%d,"pad":"%s"}\n' % (i, n, PAD)
        for i in range(first_id, first_id + count)
    )
    return body, count


class PeakRSS:
    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def test_one_gib_object_streams_with_bounded_memory(
    s3: Any, s3_endpoint: str, prefix: str, state: State
) -> None:
    key = f"{prefix}big.jsonl"
    t0 = time.monotonic()
    upload = await s3.create_multipart_upload(Bucket=BUCKET, Key=key)
    parts, total_lines, size = [], 0, 0
    with PeakRSS() as during_upload:
        for n in range(1, PARTS + 1):
            body, count = _part(n, total_lines)
            resp = await s3.upload_part(
                Bucket=BUCKET, Key=key, UploadId=upload["UploadId"], PartNumber=n, Body=body
            )
            parts.append({"PartNumber": n, "ETag": resp["ETag"]})
            total_lines += count
            size += len(body)
            del body
        await s3.complete_multipart_upload(
            Bucket=BUCKET, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
        )
    upload_s = time.monotonic() - t0
    gc.collect()
    head = await s3.head_object(Bucket=BUCKET, Key=key)
    assert head["ContentLength"] == size >= 1 << 30

    cfg = s3_config(s3_endpoint, prefix, batch_size=2000)
    source = S3Source(cfg, state.checkpoints, state.leases, worker_id="w1")
    t1 = time.monotonic()
    seen, last_id, last_offset, prev, ids_in_order = 0, -1, 0, -1, True
    with PeakRSS() as during_read:
        pump = await Pump(source).start()
        try:
            while seen < total_lines:
                batch = await pump.next(timeout=30)
                await source.commit(batch)
                seen += len(batch.records)
                last = batch.records[-1]
                last_offset = last.position["offset"]
                last_id = int(last.data[9 : last.data.index(b'"', 9)])  # {"id":"L-<n>"
                ids_in_order &= (
                    int(batch.records[0].data[9 : batch.records[0].data.index(b'"', 9)]) == prev + 1
                )
                prev = last_id
            await pump.quiet(0.5)
        finally:
            await pump.close()
            await s3.delete_object(Bucket=BUCKET, Key=key)
    read_s = time.monotonic() - t1
    print(
        f"\n1 GiB object: {total_lines} lines; upload {upload_s:.1f}s; read {read_s:.1f}s"
        f" ({size / read_s / 1e6:.0f} MB/s, {total_lines / read_s:,.0f} records/s);"
        f" peak RSS upload {during_upload.peak >> 20} MiB, read {during_read.peak >> 20} MiB"
        f" (from {during_read.start >> 20} MiB)"
    )
    assert seen == total_lines and last_id == total_lines - 1 and ids_in_order
    assert last_offset == size
    done = await state.leases.done_versions(cfg.name)
    assert done[key] == str(head["ETag"]).strip('"')
    # Growth, not the absolute figure: this pytest process carries whatever the tests before
    # it left (306 MiB at the start once in CI), the 1 GiB object must add little to it.
    grew = during_read.peak - during_read.start
    assert grew < READ_GROWTH_LIMIT, f"RSS grew {grew >> 20} MiB while reading 1 GiB"
