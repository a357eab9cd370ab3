"""Schema upgrades: valid v1 -> valid v3 with the v3 form's dedupe key; drift is typed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pipeline.decode import Decoder
from ingest.records import RawRecord, ReasonCode, Record
from ingest.schema import DriftError, ValueRuleError
from ingest.schema.validate import SchemaValidator
from ingest.transformers import CURRENT_VERSION, UPGRADES, upgrade
from ingest.transformers.v1_to_v2 import v1_to_v2
from ingest.transformers.v2_to_v3 import v2_to_v3

_DECODER = Decoder(now=lambda: 5e9)  # year 2128: every generated ts is in the past
_VALIDATOR = SchemaValidator()
_TEXT = st.text(st.characters(codec="utf-8"), max_size=30)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=5,
)


@st.composite
def attributes(draw: st.DrawFn) -> dict[str, Any]:
    known = {
        "amount": st.integers(0, 10**12) | st.floats(0, 1e12, allow_nan=False),
        "currency": st.from_regex(r"[A-Z]{3}", fullmatch=True),
        "email": st.from_regex(r"[a-z]{1,10}@[a-z]{1,10}\.example", fullmatch=True),
        "name": st.text(st.characters(codec="utf-8"), max_size=512),
        "quantity": st.integers(0, 10**9),
        "status": _TEXT,
    }
    out: dict[str, Any] = {k: draw(v) for k, v in known.items() if draw(st.booleans())}
    extra = draw(st.dictionaries(st.from_regex(r"x_[a-z]{1,8}", fullmatch=True), _JSON, max_size=3))
    return {**out, **extra}


@st.composite
def v1_records(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """A valid v1 record and its timestamp in milliseconds."""
    ms = draw(st.integers(0, 4_102_444_800_000))  # 1970 .. 2100
    data = draw(attributes())
    if draw(st.booleans()):
        data["_deleted"] = draw(st.booleans())
    record = {
        "schema_version": 1,
        "tenant": draw(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)),
        "type": draw(st.from_regex(r"[a-z][a-z0-9_]{0,63}", fullmatch=True)),
        "id": draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=256)),
        "rev": draw(st.integers(0, 2**63 - 1)),
        "ts": ms // 1000 if ms % 1000 == 0 and draw(st.booleans()) else ms / 1000,
        "data": data,
    }
    return record, ms


def _v3_equivalent(v1: dict[str, Any], ms: int) -> dict[str, Any]:
    """Written by hand from docs/schema.md, independent of the transformer code."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    occurred = moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}".rstrip("0").rstrip(".")
    attrs = {k: v for k, v in v1["data"].items() if k != "_deleted"}
    return {
        "schema_version": 3,
        "tenant_id": v1["tenant"],
        "entity_type": v1["type"],
        "entity_id": v1["id"],
        "revision": v1["rev"],
        "occurred_at": occurred + "Z",
        "attributes": attrs,
        "deleted": v1["data"].get("_deleted", False),
    }


def _decode(body: dict[str, Any]) -> Record:
    raw = RawRecord(
        orjson.dumps(body), str(body.get("tenant_id", body.get("tenant"))), "t", 0, 0, 0
    )
    out = _DECODER.decode(raw)
    assert isinstance(out, Record), out
    return out


@settings(max_examples=150, deadline=None)
@given(case=v1_records())
def test_any_valid_v1_upgrades_to_a_valid_v3_with_the_same_dedupe_key(
    case: tuple[dict[str, Any], int],
) -> None:
    v1, ms = case
    v3 = upgrade(orjson.loads(orjson.dumps(v1)))
    assert v3["schema_version"] == CURRENT_VERSION
    assert _VALIDATOR.is_valid(v3), _VALIDATOR.errors(v3)
    from_v1 = _decode(v1)
    from_v3 = _decode(_v3_equivalent(v1, ms))  # defaults (priority, relations) left out
    assert from_v1.body == from_v3.body
    assert from_v1.dedupe_key == from_v3.dedupe_key
    assert from_v1.deleted is v1["data"].get("_deleted", False)


@settings(max_examples=50, deadline=None)
@given(case=v1_records())
def test_upgrade_is_idempotent_on_v3(case: tuple[dict[str, Any], int]) -> None:
    v3 = upgrade(case[0])
    assert upgrade(v3) is v3
    assert upgrade(dict(v3)) == v3


def test_registry_is_explicit_one_step_each() -> None:
    assert {1: v1_to_v2, 2: v2_to_v3} == UPGRADES
    assert (
        v1_to_v2(
            {
                "schema_version": 1,
                "tenant": "a",
                "type": "t",
                "id": "1",
                "rev": 0,
                "ts": 0,
                "data": {},
            }
        )["schema_version"]
        == 2
    )


def test_v1_timestamps_are_canonical_utc() -> None:
    base = {"schema_version": 1, "tenant": "a", "type": "t", "id": "1", "rev": 0, "data": {}}
    assert v1_to_v2({**base, "ts": 1700000000})["occurred_at"] == "2023-11-14T22:13:20Z"
    assert v1_to_v2({**base, "ts": 1700000000.5})["occurred_at"] == "2023-11-14T22:13:20.5Z"
    assert v1_to_v2({**base, "ts": 1700000000.0})["occurred_at"] == "2023-11-14T22:13:20Z"


_V1 = {"schema_version": 1, "tenant": "a", "type": "t", "id": "1", "rev": 3, "ts": 5, "data": {}}


@pytest.mark.parametrize(
    ("body", "kind", "path", "expected", "found"),
    [
        ({k: v for k, v in _V1.items() if k != "ts"}, "required", "$.ts", "integer", "missing"),
        ({**_V1, "ts": "2024-01-01"}, "type", "$.ts", "number", "string"),
        ({**_V1, "rev": "3"}, "type", "$.rev", "integer", "string"),
        ({**_V1, "rev": True}, "type", "$.rev", "integer", "boolean"),
        ({**_V1, "data": []}, "type", "$.data", "object", "array"),
        (
            {**_V1, "tenant_id": "a"},
            "additionalProperties",
            "$.tenant_id",
            "no such field in v1",
            "string",
        ),
        ({"schema_version": 2, "tenant_id": "a"}, "required", "$.attributes", "object", "missing"),
        ({"schema_version": 2, "attributes": "x"}, "type", "$.attributes", "object", "string"),
        (
            {"schema_version": 2, "attributes": {"_deleted": "yes"}},
            "type",
            "$.attributes._deleted",
            "boolean",
            "string",
        ),
        ({"schema_version": 4}, "unknown_version", "$.schema_version", "integer 1..3", 4),
        ({"schema_version": 0}, "unknown_version", "$.schema_version", "integer 1..3", 0),
        ({"schema_version": "3"}, "unknown_version", "$.schema_version", "integer 1..3", "string"),
        (
            {"schema_version": True},
            "unknown_version",
            "$.schema_version",
            "integer 1..3",
            "boolean",
        ),
        ({}, "unknown_version", "$.schema_version", "integer 1..3", "missing"),
    ],
)
def test_shape_errors_are_drift_with_path(
    body: dict[str, Any], kind: str, path: str, expected: str, found: Any
) -> None:
    with pytest.raises(DriftError) as info:
        upgrade(body)
    err = info.value
    assert (err.kind, err.path, err.expected, err.found) == (kind, path, expected, found)
    assert err.reason is ReasonCode.SCHEMA_DRIFT
    assert err.detail()["message"]


def test_impossible_v1_timestamp_is_a_value_error() -> None:
    with pytest.raises(ValueRuleError) as info:
        upgrade({**_V1, "ts": 1e20})
    assert info.value.reason is ReasonCode.VALIDATION_FAIL
    assert info.value.path == "$.ts"
