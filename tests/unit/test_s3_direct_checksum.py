"""A direct GET's body is checked as botocore checks a GetObject's (`BodyChecksum`)."""

from __future__ import annotations

import base64
import hashlib
import itertools
import zlib

import pytest
from botocore.exceptions import FlexibleChecksumError  # type: ignore[import-untyped]
from hypothesis import given
from hypothesis import strategies as st

from ingest.sources.s3_direct import BodyChecksum, base_of, key_path

ALGORITHMS = ["crc32", "sha1", "sha256", "sha512"]  # botocore's order without the CRT


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=6))
def test_a_body_read_in_any_chunks_matches_its_checksum(data: bytes, cuts: list[int]) -> None:
    check = BodyChecksum.of(ALGORITHMS, {"x-amz-checksum-crc32": crc32_b64(data)})
    assert check is not None and check.algorithm == "crc32"
    edges = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    for a, b in itertools.pairwise(edges):
        check.update(data[a:b])
    check.verify()


@given(st.binary(min_size=1, max_size=500), st.data())
def test_a_changed_byte_fails_the_check(data: bytes, draw: st.DataObject) -> None:
    at = draw.draw(st.integers(0, len(data) - 1))
    bad = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
    check = BodyChecksum.of(ALGORITHMS, {"x-amz-checksum-sha256": sha256_b64(data)})
    assert check is not None
    check.update(bad)
    with pytest.raises(FlexibleChecksumError):
        check.verify()


def test_the_header_checked_is_botocores_choice() -> None:
    data = b'{"id": 1}\n'
    both = {"x-amz-checksum-sha256": "wrong", "x-amz-checksum-crc32": crc32_b64(data)}
    check = BodyChecksum.of(ALGORITHMS, both)  # crc32 comes first in botocore's order
    assert check is not None and check.algorithm == "crc32"
    composite = {"x-amz-checksum-crc32": "AAAAAA==-3", "x-amz-checksum-sha256": sha256_b64(data)}
    check = BodyChecksum.of(ALGORITHMS, composite)  # a multipart crc32 is skipped
    assert check is not None and check.algorithm == "sha256"
    assert BodyChecksum.of(ALGORITHMS, {"x-amz-checksum-crc32c": "AAAAAA=="}) is None
    assert BodyChecksum.of([], {"x-amz-checksum-crc32": crc32_b64(data)}) is None


def test_only_the_url_of_that_key_in_that_bucket_is_learnt() -> None:
    path = key_path("b.jsonl")
    assert base_of("http://127.0.0.1:9000/bucket/b.jsonl", "bucket", path)
    assert base_of("https://bucket.s3.us-east-1.amazonaws.com/b.jsonl", "bucket", path)
    # another key's GET ending the same way, an endpoint with a path of its own, a query
    assert not base_of("http://127.0.0.1:9000/bucket/a/b.jsonl", "bucket", path)
    assert not base_of("http://127.0.0.1:9000/s3/bucket/b.jsonl", "bucket", path)
    assert not base_of("http://127.0.0.1:9000/bucket/b.jsonl?x=1", "bucket", path)
    assert not base_of("https://other.s3.amazonaws.com/b.jsonl", "bucket", path)
    assert key_path("a b/ü~+.jsonl") == "a%20b/%C3%BC~%2B.jsonl"
