"""The compiled decoder reads a RawRecord's fields from their slots (the offsets its type's
member descriptors give) rather than by getattr; objects of any other type are read by
getattr. Whatever the mix of types in a batch, every answer and the batch's facts are what
the same raws give as plain attribute reads."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pipeline.decode import Decoder
from ingest.records import RawRecord, Record

DECODER = Decoder()
pytestmark = pytest.mark.skipif(
    DECODER.path != "compiled", reason="the compiled decoder (ingest_native) is not installed"
)


class Tagged(RawRecord, gc=False):
    """A RawRecord of another type (one more field: its slots sit elsewhere)."""

    tag: int = 0


# A Struct of its own with RawRecord's field names and one more that sorts first: every
# field's slot sits at another offset than in a RawRecord.
Shifted = msgspec.defstruct(
    "Shifted", [("aaa", int), *((name, Any) for name in RawRecord.__struct_fields__)], gc=False
)


class Plain:
    """Not a Struct at all: read by getattr."""

    def __init__(self, raw: RawRecord) -> None:
        for name in RawRecord.__struct_fields__:
            setattr(self, name, getattr(raw, name))


def line(i: int) -> bytes:
    return (
        b'{"schema_version":3,"tenant_id":"t","entity_type":"order","entity_id":"e%d",'
        b'"revision":1,"occurred_at":"2025-01-01T00:00:00Z","attributes":{}}' % i
    )


def answer(item: Any) -> Any:
    if type(item) is Record:
        return ("record", item.dedupe_key, item.entity_key, item.sqlite_row, item.raw.seq)
    return ("other", repr(item))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["raw", "raw", "tagged", "shifted", "plain"]),
            st.sampled_from(["t", "u"]),  # the route's tenant (u: not the record's)
            st.booleans(),  # meta set: Python decodes it
            st.sampled_from([b"", b"not json"]),  # b"": a good line
        ),
        min_size=1,
        max_size=12,
    )
)
def test_slots_read_as_getattr_reads(specs: list[tuple[str, str, bool, bytes]]) -> None:
    raws: list[Any] = []
    for i, (kind, tenant, meta, bad) in enumerate(specs):
        raw = RawRecord(bad or line(i), tenant, "s", i, None, 1.0, None, {"x": 1} if meta else {})
        if kind == "tagged":
            raw = Tagged(*(getattr(raw, f) for f in RawRecord.__struct_fields__), tag=i)
        elif kind == "shifted":
            raw = Shifted(i, *(getattr(raw, f) for f in RawRecord.__struct_fields__))
        elif kind == "plain":
            raw = Plain(raw)
        raws.append(raw)
    plain = [Plain(r) if not isinstance(r, Plain) else r for r in raws]
    got, facts = DECODER.decode_batch(raws)
    want, want_facts = DECODER.decode_batch(plain)
    assert [answer(a) for a in got] == [answer(a) for a in want]
    assert (facts is None) == (want_facts is None)
    if facts is not None and want_facts is not None:
        assert (facts.keys, facts.entities, facts.unique, facts.tenant) == (
            want_facts.keys,
            want_facts.entities,
            want_facts.unique,
            want_facts.tenant,
        )
        assert facts.source == "s" and facts.event_time == 1.0
