"""The decoder's fast path never changes an answer, and integers are never altered.

`Decoder.decode_many` takes the fast path (a typed decoder compiled from the schema) and falls
back to the full classifier (`Decoder._decode`) for anything it does not accept. The contract:
for every input, both give the same answer (the same record and key, or the same failure).
Generated records mutate every field of a valid one towards its schema's edges.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingest.pipeline.decode import INT_MAX, INT_MIN, DecodeFailure, Decoder
from ingest.pipeline.worker import _decode_failure_entry
from ingest.records import RawRecord, ReasonCode, Record
from ingest.schema.fast import FastSchema, Unsupported, strict_pattern
from tests.unit.test_decode import NOW, good

VALUE = ReasonCode.VALIDATION_FAIL


def raw_of(data: bytes, tenant: str = "acme") -> RawRecord:
    return RawRecord(data, tenant, "test", 1, 1, NOW)


DECODER = Decoder(now=lambda: NOW)  # compiling the schemas is slow: one for every example


def both(data: bytes, tenant: str = "acme") -> tuple[Any, Any]:
    decoder = DECODER
    raw = raw_of(data, tenant)
    fast = decoder.decode_many([raw])[0]
    slow = decoder._decode(raw, NOW + 86400)
    return fast, slow


def same(fast: Any, slow: Any) -> None:
    assert type(fast) is type(slow), (fast, slow)
    if isinstance(slow, Record):
        assert fast.dedupe_key == slow.dedupe_key
        assert fast.body == slow.body
        for name in ("tenant", "entity_type", "entity_id", "revision", "deleted", "priority"):
            assert getattr(fast, name) == getattr(slow, name)
        assert fast.entity_key == slow.entity_key
    else:
        assert (fast.reason, fast.detail) == (slow.reason, slow.detail)


def test_the_shipped_schema_has_a_fast_path() -> None:
    fast = FastSchema()
    assert fast.enabled, fast.reason
    assert fast.known_attributes == {"amount", "currency", "email", "name", "quantity", "status"}


def test_a_schema_keyword_the_fast_path_cannot_reproduce_turns_it_off() -> None:
    from ingest.schema import load_schema

    schema = orjson.loads(orjson.dumps(load_schema()))
    schema["properties"]["entity_id"]["multipleOf"] = 2
    off = FastSchema(schema)
    assert not off.enabled and "multipleOf" in off.reason


@pytest.mark.parametrize("pattern", [r"^\d+$", r"^(?i)a$", r"a$b"])
def test_patterns_that_read_differently_in_python_are_refused(pattern: str) -> None:
    with pytest.raises(Unsupported):
        strict_pattern(pattern)


def test_dollar_does_not_match_before_a_final_newline() -> None:
    import re

    assert re.search(strict_pattern("^[a-z]+$"), "order\n") is None
    fast, slow = both(orjson.dumps(good(entity_type="order\n")))
    assert isinstance(slow, DecodeFailure) and slow.detail["kind"] == "pattern"
    same(fast, slow)


texts = st.one_of(
    st.sampled_from(["acme", "order", "o-1", "EUR", "eur", "", "x" * 513, "a@b.example", "nope"]),
    st.text(max_size=12),
)
times = st.one_of(
    st.sampled_from(
        [
            "2024-05-01T11:00:00Z",
            "2024-05-01T11:00:00.5+02:00",
            "2024-05-02T12:00:01Z",
            "2024-05-01T11:00:00",
            "2024-02-30T00:00:00Z",
            "2024-05-01t11:00:00z",
            "2024-05-01T23:59:60Z",
            "2024-05-01 11:00:00Z",
            "yesterday",
        ]
    ),
    st.text(max_size=25),
)
ints = st.one_of(
    st.integers(-3, 10),
    st.sampled_from([INT_MAX, INT_MAX + 1, INT_MIN, INT_MIN - 1, 2**63 - 1, 2**63, 10**30]),
    st.integers(),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
attributes = st.dictionaries(
    st.one_of(st.sampled_from(["amount", "currency", "email", "name", "quantity", "status"]),
              st.text(max_size=6)),
    values,
    max_size=5,
)
relations = st.lists(
    st.dictionaries(
        st.sampled_from(["type", "target_type", "target_id", "extra"]),
        st.one_of(st.sampled_from(["OWNS", "owns", "customer", "c-1", ""]), values),
        max_size=4,
    ),
    max_size=2,
)
fields = {
    "schema_version": st.one_of(st.sampled_from([1, 2, 3, 3.0, "3", True, 4]), ints),
    "tenant_id": texts,
    "entity_type": texts,
    "entity_id": texts,
    "revision": st.one_of(ints, st.sampled_from([7.0, "7", True, None])),
    "occurred_at": times,
    "priority": st.one_of(st.sampled_from(["high", "normal", "low", "urgent", None]), values),
    "attributes": st.one_of(attributes, values),
    "relations": st.one_of(relations, values),
    "deleted": st.one_of(st.booleans(), values),
    "extra": values,
}


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    body = good()
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        if draw(st.booleans()) and name in body:
            del body[name]
        else:
            body[name] = draw(fields[name])
    return body


def encode(body: dict[str, Any]) -> bytes:
    """JSON with any integer (orjson refuses those past 64 bits, the stdlib does not)."""
    import json

    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
@example(good(attributes={"amount": 2**64}))
@example(good(attributes={"deep": [{"x": -(2**63) - 1}]}))
@example(good(revision=2**63))
@example(good(revision=2**64))
@example(good(relations=[{"type": "OWNS", "target_type": "customer", "target_id": "c-1"}]))
def test_fast_and_slow_path_give_the_same_answer(body: dict[str, Any]) -> None:
    fast, slow = both(encode(body))
    same(fast, slow)
    if isinstance(slow, DecodeFailure):
        orjson.dumps(slow.detail)  # storable in the DLQ as it is
        entry = _decode_failure_entry(raw_of(encode(body)), slow, NOW)
        assert entry.revision is None or 0 <= entry.revision <= 2**63 - 1


@settings(max_examples=300, deadline=None)
@given(st.integers())
@example(2**64 - 1)
@example(2**64)
@example(-(2**63))
@example(-(2**63) - 1)
def test_integers_are_kept_exactly_or_refused_never_altered(n: int) -> None:
    body = good(attributes={"big": n, "nested": {"list": [n]}})
    fast, slow = both(encode(body))
    same(fast, slow)
    if INT_MIN <= n <= INT_MAX:
        assert isinstance(fast, Record)
        assert fast.body["attributes"] == {"big": n, "nested": {"list": [n]}}
        assert type(fast.body["attributes"]["big"]) is int
    else:
        assert isinstance(fast, DecodeFailure) and fast.reason is VALUE
        assert fast.detail["kind"] == "range" and fast.detail["path"] == "$.attributes.big"
        assert fast.detail["found"] == str(n)[:100] + ("…" if len(str(n)) > 100 else "")


@pytest.mark.parametrize("revision", [2**63, 2**64, 10**30])
def test_revision_past_the_maximum_is_validation_fail_at_decode(revision: int) -> None:
    fast, slow = both(encode(good(revision=revision)))
    same(fast, slow)
    assert isinstance(fast, DecodeFailure) and fast.reason is VALUE
    assert (fast.detail["kind"], fast.detail["path"]) == ("maximum", "$.revision")
    entry = _decode_failure_entry(raw_of(encode(good(revision=revision))), fast, NOW)
    assert entry.revision is None and entry.entity_id == "o-1"
    orjson.dumps(entry.detail)


def test_occurred_at_cache_keeps_the_answer() -> None:
    decoder = Decoder(now=lambda: NOW)
    lines = [orjson.dumps(good(occurred_at=t, entity_id=str(i)))
             for i, t in enumerate(["2024-05-01T11:00:00Z", "bad", "bad", "2024-05-01T11:00:00Z"])]
    out = decoder.decode_many([raw_of(d) for d in lines])
    assert [type(r).__name__ for r in out] == ["Record", "DecodeFailure", "DecodeFailure", "Record"]
    assert decoder._times["bad"] == math.inf


def test_remembered_good_strings_let_no_bad_combination_through() -> None:
    """The decoder remembers (tenant, entity_type) pairs found good; a pair with one bad
    member is checked, and refused, however many good pairs were seen before."""
    decoder = Decoder(now=lambda: NOW)
    for i in range(3000):  # past the bound: the memory is cleared, not grown
        rec = decoder.decode_many([raw_of(orjson.dumps(good(entity_type=f"t{i}")))])[0]
        assert isinstance(rec, Record)
        assert len(decoder._fast.good_strings) <= 1024
    for bad in ("Order", "order!", "9order", ""):
        fast, slow = both(orjson.dumps(good(entity_type=bad)))
        assert isinstance(slow, DecodeFailure)
        same(fast, slow)
        out = decoder.decode_many([raw_of(orjson.dumps(good(entity_type=bad)))])[0]
        assert isinstance(out, DecodeFailure) and out.reason is VALUE


edges = st.one_of(
    st.integers(-3, 3),
    st.floats(-2.0, 2.0),
    st.sampled_from([0, 0.0, -0.0, -1e-300, 1e300, 2**63, True, False, None, [], {}, {"a": 1}]),
    st.sampled_from(["EUR", "eur", "EU", "EURO", "EUR\n", "", "a@b.example", "a@", "nope"]),
    st.sampled_from(["x" * 511, "x" * 512, "x" * 513, "é" * 512, "é" * 513]),
    st.text(max_size=4),
)
known_attributes = st.dictionaries(
    st.sampled_from(["amount", "currency", "email", "name", "quantity", "status", "other"]),
    edges,
    max_size=4,
)


@settings(max_examples=400, deadline=None)
@given(known_attributes)
@example({"amount": -1})
@example({"amount": -0.5})
@example({"quantity": True})
@example({"quantity": 1.0})
@example({"name": "é" * 513})
@example({"currency": "EUR\n"})
def test_known_attribute_rules_give_the_classifiers_answer(attributes: dict[str, Any]) -> None:
    """The generated check of the known attributes (`FastSchema.attributes_ok`) at their
    rules' edges: never more lenient than the classifier, and not stricter either, but for
    the one case it leaves to the slow path (an integer attribute sent as `1.0`)."""
    fast, slow = both(encode(good(attributes=attributes)))
    same(fast, slow)
    ok = DECODER._fast.attributes_ok(attributes)
    if isinstance(slow, DecodeFailure):
        assert not ok or slow.detail["kind"] == "range"  # 2**63 is a number, not storable
    elif type(attributes.get("quantity")) is not float:
        assert ok
