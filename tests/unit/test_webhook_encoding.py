"""The webhook door undoes Content-Encoding completely, or refuses: never part of a body.

Found in review: a gzip body of two members (RFC 1952 allows any number; `cat a.gz b.gz`,
a sender that flushes a member per chunk) was answered 202 with the first member's records
only, the rest dropped without a word, and bytes after the compressed data were ignored too;
a zlib stream with a window under 32 KiB (header byte 0x08..0x68, not 0x78) was taken for raw
deflate and refused as 400.
"""

from __future__ import annotations

import gzip
import time
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.responses import Response

from ingest.webhook.http import _decode

LIMIT = 1 << 20

chunks = st.lists(st.binary(max_size=3000), min_size=1, max_size=4)


def refused(out: bytes | Response) -> tuple[int, str]:
    assert isinstance(out, Response), out
    return out.status_code, bytes(out.body).decode()


@settings(max_examples=150, deadline=None)
@given(parts=chunks, level=st.integers(0, 9), padding=st.integers(0, 3))
def test_every_gzip_member_is_inflated(parts: list[bytes], level: int, padding: int) -> None:
    body = b"".join(gzip.compress(p, compresslevel=level) for p in parts) + b"\0" * padding
    assert _decode(body, ["gzip"], LIMIT) == b"".join(parts)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=5000), wbits=st.integers(9, 15), level=st.integers(0, 9),
       raw=st.booleans())  # fmt: skip
def test_deflate_of_any_window_zlib_or_raw(data: bytes, wbits: int, level: int,
                                           raw: bool) -> None:  # fmt: skip
    c = zlib.compressobj(level, zlib.DEFLATED, -wbits if raw else wbits)
    assert _decode(c.compress(data) + c.flush(), ["deflate"], LIMIT) == data


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=2000), junk=st.binary(min_size=1, max_size=50),
       coding=st.sampled_from(["gzip", "deflate"]))  # fmt: skip
def test_bytes_after_the_compressed_data_are_refused(data: bytes, junk: bytes,
                                                     coding: str) -> None:  # fmt: skip
    if coding == "gzip" and not junk.strip(b"\0"):
        junk += b"x"  # NULs alone are padding gzip(1) allows
    body = (gzip.compress(data) if coding == "gzip" else zlib.compress(data)) + junk
    status, text = refused(_decode(body, [coding], LIMIT))
    assert status == 400 and "bad_encoding" in text


def test_limit_counts_every_member() -> None:
    member = gzip.compress(b"x" * (LIMIT // 2 + 1))
    assert refused(_decode(member * 2, ["gzip"], LIMIT))[0] == 413
    assert _decode(member, ["gzip"], LIMIT) == b"x" * (LIMIT // 2 + 1)


def test_many_tiny_members_cost_linear_time() -> None:
    """What zlib copies past each member's end stays small: 5 MiB of 20-byte members once
    took 23 s (the rest of the body copied per member); well under that now."""
    body = gzip.compress(b"", mtime=0) * ((5 << 20) // 20)
    t0 = time.perf_counter()
    assert _decode(body, ["gzip"], 5 << 20) == b""
    assert time.perf_counter() - t0 < 15  # ~0.7 s on the 2 loaded cores; quadratic: minutes
