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

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pipeline.decode import DecodeFailure, Decoder
from ingest.records import RawRecord, Record
from ingest.schema.fast import FastSchema
from ingest.webhook.http import _array_elements, split_records

DECODER = Decoder()
BIG = 2**64  # the first integer no 64-bit field holds
KNOWN = FastSchema().known_attributes  # the attributes the schema types


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


# Attribute names the schema does not type: a generated "email" or "name" holding a number
# would be refused for its type, which is not what this test is about.
free_names = st.text(min_size=1, max_size=6).filter(lambda k: k not in KNOWN)


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
    st.lists(st.dictionaries(free_names, values, max_size=3), min_size=1, max_size=4),
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


tricky_text = st.text(alphabet='[]{},"\\ \n\tax\u00e9\u2028', max_size=8)
elements = st.recursive(
    st.one_of(scalars, tricky_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(elements, min_size=1, max_size=5), st.sampled_from([None, 0, 2, "\t"]))
def test_the_deep_nesting_splitter_cuts_arrays_as_msgspec_does(
    items: list[Any], indent: int | str | None
) -> None:
    """`_array_elements` (used when msgspec cannot recurse deep enough) gives the same bytes
    as msgspec's Raw elements, whatever brackets, commas, quotes and escapes the strings hold."""

    body = json.dumps(items, indent=indent, ensure_ascii=False).encode()
    want = [bytes(raw) for raw in msgspec.json.Decoder(list[msgspec.Raw]).decode(body)]
    assert _array_elements(body) == want


@pytest.mark.parametrize("where", [0, 1, 3])
@pytest.mark.parametrize("indent", [None, 2])
def test_an_element_too_deep_for_msgspec_leaves_its_siblings_exact(
    where: int, indent: int | None
) -> None:
    """Review finding: an array element nested ~1,000 deep (orjson reads up to 1,024) made
    msgspec give up, and the fallback re-serialized every element with orjson, which writes at
    most 255 levels: TypeError, a 500 with a traceback. Now the elements are cut from the
    bytes sent: the siblings exact (integers beyond 64 bits refused, not floats), the deep one
    to the decoder, which rejects it."""
    deep = b"[" * 1000 + b"1" + b"]" * 1000  # built by hand: json.dumps recurses too
    attrs = [{"x": BIG * 10**10}, {"x": BIG - 1, "s": "[{,]}"}, {"x": -(2**63) - 1}]
    records: list[Any] = [envelope(i, a) for i, a in enumerate(attrs)]
    at = min(where, len(records))
    records.insert(at, deep)
    sep = b",\n  " if indent else b", "
    body = b"[" + sep.join(r if r is deep else json.dumps(r, indent=indent).encode()
                           for r in records) + b"]"  # fmt: skip
    with pytest.raises(RecursionError):  # what sends this body down the fallback
        msgspec.json.Decoder(list[msgspec.Raw]).decode(body)
    lines, malformed = split_records(body, "application/json")
    assert isinstance(lines, list) and malformed == 0 and len(lines) == len(records)
    for i, (line, rec) in enumerate(zip(lines, records, strict=True)):
        assert b"\n" not in line and b"\r" not in line
        out = DECODER.decode_many([RawRecord(line, "t", "s", i, i, 0.0)])[0]
        if i == at:
            assert line == deep and isinstance(out, DecodeFailure), out
            continue
        if has_big(rec["attributes"]):
            assert isinstance(out, DecodeFailure), out
            assert out.detail["kind"] == "range", out.detail
        else:
            assert isinstance(out, Record), getattr(out, "detail", out)
            assert json.loads(line) == rec  # exactly what was sent, integers digit for digit
