"""Dedupe keys: the same record gives the same key however it is spelled; any change differs."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.records import RawRecord, dedupe_key, raw_dedupe_key

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                    st.text(max_size=20), st.floats(allow_nan=False, allow_infinity=False))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
bodies = st.fixed_dictionaries({
    "schema_version": st.just(3), "tenant_id": st.sampled_from(["a", "b"]),
    "entity_type": st.sampled_from(["order", "user"]), "entity_id": st.text(min_size=1, max_size=8),
    "revision": st.integers(0, 10), "attributes": st.dictionaries(st.text(max_size=8), values,
                                                                  max_size=5)})


def shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


@settings(max_examples=100)
@given(bodies, st.randoms(use_true_random=False))
def test_key_ignores_member_order(body: dict[str, Any], rng: random.Random) -> None:
    assert dedupe_key(body) == dedupe_key(shuffled(body, rng))
    assert len(dedupe_key(body)) == 32


@settings(max_examples=100)
@given(bodies, st.sampled_from(["revision", "entity_id", "tenant_id", "attributes"]))
def test_any_change_changes_the_key(body: dict[str, Any], field: str) -> None:
    changed = dict(body)
    if field == "revision":
        changed["revision"] = body["revision"] + 1
    elif field == "attributes":
        changed["attributes"] = {**body["attributes"], "__extra": 1}
    else:
        changed[field] = body[field] + "x"
    assert dedupe_key(body) != dedupe_key(changed)


@given(st.binary(max_size=64), st.sampled_from(["a", "b"]))
def test_raw_key_is_per_tenant_and_bytes(data: bytes, tenant: str) -> None:
    def raw(t: str, d: bytes) -> RawRecord:
        return RawRecord(data=d, tenant=t, source="s", seq=0, position=None, event_time=0.0)

    assert raw_dedupe_key(raw(tenant, data)) == raw_dedupe_key(raw(tenant, data))
    assert raw_dedupe_key(raw("a", data)) != raw_dedupe_key(raw("b", data))
    assert raw_dedupe_key(raw(tenant, data)) != raw_dedupe_key(raw(tenant, data + b" "))
