"""The decoder never raises, whatever the bytes: every line is a Record or a DecodeFailure.

(Found by the fuzz test through the running service: deep nesting raised RecursionError in
the typed fast path and the schema validator. The runner isolates such a raise, but it must
be a classified VALIDATION_FAIL in the first place.)
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pipeline.decode import DecodeFailure, Decoder
from ingest.records import RawRecord, ReasonCode, Record
from tests._hostile import Hostile, hostile_records, nested, render

DECODER = Decoder()


@settings(max_examples=300, deadline=None)
@given(st.lists(hostile_records("t"), min_size=1, max_size=8))
def test_hostile_lines_decode_to_a_record_or_a_classified_failure(items: list[Hostile]) -> None:
    raws = [RawRecord(render(item, f"e{i}-")[0], "t", "s", i, i, 0.0)
            for i, item in enumerate(items)]
    out = DECODER.decode_many(raws)
    assert len(out) == len(raws)
    for item in out:
        assert isinstance(item, Record | DecodeFailure)
        if isinstance(item, DecodeFailure):
            assert isinstance(item.reason, ReasonCode) and item.detail["message"]


def test_deep_nesting_is_validation_fail_at_every_depth() -> None:
    import json

    for depth in (255, 300, 990, 1000, 1500, 5000):
        head = (b'{"schema_version":3,"tenant_id":"t","entity_type":"order","entity_id":"e",'
                b'"revision":1,"occurred_at":"2025-01-01T00:00:00Z","attributes":{"a":')
        inner = b"[" * depth + b"]" * depth
        other = json.dumps({"x": 1}).encode()[:-1] + b',"y":' + inner + b"}"
        for data in (head + inner + b"}}", inner, other):
            [got] = DECODER.decode_many([RawRecord(data, "t", "s", 1, 0, 0.0)])
            assert isinstance(got, DecodeFailure), depth
            assert got.reason in (ReasonCode.VALIDATION_FAIL, ReasonCode.SCHEMA_DRIFT)
    assert nested(3) == [{"k": [1]}]


_VALID = st.fixed_dictionaries({
    "schema_version": st.just(3), "tenant_id": st.just("t"), "entity_type": st.just("order"),
    "entity_id": st.text(min_size=1, max_size=20), "revision": st.integers(0, 10**6),
    "occurred_at": st.just("2025-01-01T00:00:00Z"),
    "attributes": st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3),
})  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(_VALID, st.sampled_from(["gzip", "utf16", "utf16be", "latin1", "nul"]), st.data())
def test_unparseable_bytes_say_what_they_are(
    rec: dict[str, object], damage: str, data: st.DataObject
) -> None:
    """Found by dropping such files into the inbox: each line's DLQ detail said only "JSON is
    malformed: invalid character (byte 0)". It now names the cause and the fix (docs/schema.md:
    kind `utf8` for text that is not UTF-8)."""
    import gzip
    import json

    text = json.dumps(rec, ensure_ascii=False)
    if damage == "gzip":
        line = gzip.compress(text.encode())
    elif damage == "utf16":
        line = text.encode("utf-16")
    elif damage == "utf16be":
        line = text.encode("utf-16-be")
    elif damage == "latin1":
        line = text.replace('"order"', '"ordér"').encode("latin-1", "replace")
    else:
        at = data.draw(st.integers(4, len(text) - 1))  # between characters
        line = text[:at].encode() + b"\x00" + text[at:].encode()
    out = DECODER.decode(RawRecord(line, "t", "s", 0, 0, 0.0))
    assert isinstance(out, DecodeFailure) and out.reason is ReasonCode.VALIDATION_FAIL
    message = out.detail["message"]
    expected = {
        "gzip": ("json", "gzip-compressed"),
        "utf16": ("utf8", "UTF-16"),
        "utf16be": ("utf8", "UTF-16"),
        "latin1": ("utf8", "not UTF-8: byte 0x"),
        "nul": ("json", "NUL byte at offset"),
    }[damage]
    assert out.detail["kind"] == expected[0], out.detail
    assert expected[1] in message, message


_HIGH = st.integers(0xD800, 0xDBFF)
_LOW = st.integers(0xDC00, 0xDFFF)


@settings(max_examples=200, deadline=None)
@given(_VALID, st.sampled_from(["high", "low", "high+other"]), _HIGH, _LOW, st.data())
def test_a_lone_surrogate_escape_is_named_where_it_is(
    rec: dict[str, object], shape: str, high: int, low: int, data: st.DataObject
) -> None:
    """Found at the end of a session: a record holding `"\\ud800"` went to the DLQ as
    "not valid JSON: Input data was truncated" (the parser's words), which sends whoever reads
    it looking for a cut-off line. Valid pairs and escaped backslashes before it are no lone
    surrogates; the detail names the escape and its offset."""
    import json

    lone = {"high": f"\\u{high:04x}", "low": f"\\u{low:04X}", "high+other": f"\\u{high:04x}"}[shape]
    after = "\\u0041" if shape == "high+other" else data.draw(st.sampled_from(["", "x", " "]))
    before = data.draw(st.sampled_from(["", "\\\\", f"\\u{high:04x}\\u{low:04x}", "\\\\\\\\u"]))
    text = json.dumps(rec)[:-1] + f', "z": "{before}{lone}{after}"' + "}"
    line = text.encode()
    out = DECODER.decode(RawRecord(line, "t", "s", 0, 0, 0.0))
    assert isinstance(out, DecodeFailure) and out.reason is ReasonCode.VALIDATION_FAIL
    at = text.rindex(lone)
    assert out.detail["kind"] == "utf8", out.detail
    assert f"lone UTF-16 surrogate escape {lone} at offset {at}" in out.detail["message"]


@settings(max_examples=100, deadline=None)
@given(_VALID, _HIGH, _LOW)
def test_pairs_and_escaped_backslashes_are_no_lone_surrogates(
    rec: dict[str, object], high: int, low: int
) -> None:
    import json

    from ingest.pipeline.decode import _lone_surrogate

    text = json.dumps(rec)[:-1] + f', "z": "\\u{high:04x}\\u{low:04x} \\\\u{low:04x}"' + "}"
    assert _lone_surrogate(text.encode()) is None
    assert json.loads(text)["z"].endswith(f"\\u{low:04x}")
