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
