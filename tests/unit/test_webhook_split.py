"""The webhook door splits a body into the record lines the intake stores, whatever its layout.

Found by driving the service: a pretty-printed JSON object (the most common body there is)
got 500, because its newlines reached the intake, which stores one record per line; and a JSON
array was re-serialized by orjson, which turns an integer beyond 64 bits into a float, so
`{"x": 123456789012345678901234567890}` was stored as `1.2345678901234568e+29` instead of being
refused as VALIDATION_FAIL `range` (docs/schema.md, Integers).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pipeline.decode import DecodeFailure, Decoder
from ingest.records import RawRecord, Record
from ingest.webhook.http import split_records

DECODER = Decoder()
BIG = 2**64  # the first integer no 64-bit field holds


def envelope(i: int, attrs: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": 3, "tenant_id": "t", "entity_type": "order",
            "entity_id": f"e-{i}", "revision": 1, "occurred_at": "2025-01-01T00:00:00Z",
            "attributes": attrs}  # fmt: skip


scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(min_value=BIG, max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                               max_size=3),
    max_leaves=8,
)


def has_big(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return not -(2**63) <= v < BIG
    if isinstance(v, list):
        return any(has_big(x) for x in v)
    if isinstance(v, dict):
        return any(has_big(x) for x in v.values())
    return False


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.dictionaries(st.text(min_size=1, max_size=6), values, max_size=3), min_size=1,
             max_size=4),
    st.sampled_from([None, 2, "\t"]),
    st.booleans(),
    st.sampled_from(["application/json", "", "application/json; charset=utf-8"]),
)  # fmt: skip
def test_any_layout_gives_one_line_per_record_decoded_as_sent(
    attrs: list[dict[str, Any]], indent: int | str | None, as_array: bool, ctype: str
) -> None:
    records = [envelope(i, a) for i, a in enumerate(attrs)]
    if not as_array:
        records = records[:1]
    doc: Any = records if as_array else records[0]
    body = json.dumps(doc, indent=indent).encode()
    if indent is not None:
        body = body.replace(b"\n", b"\r\n", 1)  # a Windows sender's line ends too
    lines, malformed = split_records(body, ctype)
    assert isinstance(lines, list), lines
    assert malformed == 0 and len(lines) == len(records)
    for i, (line, rec) in enumerate(zip(lines, records, strict=True)):
        assert b"\n" not in line and b"\r" not in line
        out = DECODER.decode_many([RawRecord(line, "t", "s", i, i, 0.0)])[0]
        if has_big(rec["attributes"]):
            assert isinstance(out, DecodeFailure), out
            assert out.detail["kind"] == "range", out.detail
        else:
            assert isinstance(out, Record), getattr(out, "detail", out)
            assert out.entity_id == rec["entity_id"]
            assert json.loads(line) == rec  # exactly what was sent, integers digit for digit
