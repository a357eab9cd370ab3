"""S3Source's own GETs (`ingest.sources.s3_direct`) against a real SeaweedFS S3 server: after
botocore's first GET they are sent directly, read the bytes botocore reads, and leave every
answer but a 200/206 to botocore."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from ingest.sources.objects import ItemRef
from ingest.sources.s3 import S3Source
from tests.integration._fixtures_files import State, jsonl, put, s3_config

pytestmark = pytest.mark.integration

# Keys botocore percent-encodes (space, non-ASCII, reserved and sub-delims) or keeps ('/', '~')
KEYS = [
    "plain.jsonl",
    "a b.jsonl",
    "ünï-cødé.jsonl",
    "x+y=z~1.jsonl",
    "p%q,r;s@t&u!(v)'w*.jsonl",
    "dir/sub dir/k.jsonl",
]


async def _read(source: S3Source, ref: ItemRef, start: int = 0) -> bytes:
    return b"".join([chunk async for chunk in source.open_item(ref, start)])


async def test_gets_after_the_first_are_sent_directly_and_read_the_same_bytes(
    s3: Any, s3_endpoint: str, prefix: str, state: State
) -> None:
    bodies = {f"{prefix}{k}": jsonl(f"k{i}", 50 + i) for i, k in enumerate(KEYS)}
    refs = [ItemRef(key, await put(s3, key, body), len(body), 0.0) for key, body in bodies.items()]
    source = S3Source(
        s3_config(s3_endpoint, prefix), state.checkpoints, state.leases, worker_id="w1"
    )
    try:
        for ref in refs:
            assert await _read(source, ref) == bodies[ref.name]
        direct = source._direct
        assert direct is not None, "botocore's first GET taught nothing"
        assert direct.sent == len(refs) - 1  # every GET after the first, none fell back
        for ref in refs:  # ranged: from an offset within the object
            start = len(bodies[ref.name]) // 3
            assert await _read(source, ref, start) == bodies[ref.name][start:]
        assert direct.sent == 2 * len(refs) - 1
    finally:
        await source.close_client()


async def test_a_replaced_object_is_refused_as_botocore_refuses_it(
    s3: Any, s3_endpoint: str, prefix: str, state: State
) -> None:
    """The direct GET's 412 (If-Match: the ETag leased) goes to botocore, which raises its
    ClientError: `describe` classifies it as before (read again as the new version)."""
    first, key = f"{prefix}first.jsonl", f"{prefix}replaced.jsonl"
    await put(s3, first, jsonl("f", 5))
    old = await put(s3, key, jsonl("old", 10))
    await put(s3, key, jsonl("new", 12))
    source = S3Source(
        s3_config(s3_endpoint, prefix), state.checkpoints, state.leases, worker_id="w1"
    )
    try:
        await _read(source, ItemRef(first, await put(s3, first, jsonl("f", 5)), 0, 0.0))
        assert source._direct is not None
        with pytest.raises(ClientError) as caught:
            await _read(source, ItemRef(key, old, 0, 0.0))
        assert caught.value.response["Error"]["Code"] in ("PreconditionFailed", "412")
        assert "changed or removed" in source.describe(caught.value).message
        assert source._direct.sent == 0
    finally:
        await source.close_client()
