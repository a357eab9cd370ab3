"""The decoder's one-time classification: SCHEMA_DRIFT for shape, VALIDATION_FAIL for values."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ingest.pipeline.decode import DecodeFailure, Decoder
from ingest.records import RawRecord, ReasonCode, Record

NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z
DRIFT, VALUE = ReasonCode.SCHEMA_DRIFT, ReasonCode.VALIDATION_FAIL


def good(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema_version": 3,
        "tenant_id": "acme",
        "entity_type": "order",
        "entity_id": "o-1",
        "revision": 7,
        "occurred_at": "2024-05-01T11:00:00Z",
        "attributes": {"amount": 12.5, "currency": "EUR", "email": "a@b.example", "name": "n"},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def attrs(**changes: Any) -> dict[str, Any]:
    return {**good()["attributes"], **changes}


def raw(body: Any = None, data: bytes | None = None, tenant: str = "acme", **kw: Any) -> RawRecord:
    payload = orjson.dumps(body) if data is None else data
    return RawRecord(payload, tenant, "test", 1, 1, NOW, **kw)


def fail(r: RawRecord, decoder: Decoder | None = None) -> DecodeFailure:
    out = (decoder or Decoder(now=lambda: NOW)).decode(r)
    assert isinstance(out, DecodeFailure), out
    return out


def test_valid_record_gets_defaults_and_key() -> None:
    out = Decoder(now=lambda: NOW).decode(raw(good()))
    assert isinstance(out, Record)
    assert out.body["priority"] == "normal" and out.body["relations"] == []
    assert out.deleted is False and out.revision == 7
    explicit = Decoder(now=lambda: NOW).decode(
        raw(good(priority="normal", relations=[], deleted=False))
    )
    assert isinstance(explicit, Record) and explicit.dedupe_key == out.dedupe_key
    other = Decoder(now=lambda: NOW).decode(raw(good(revision=8)))
    assert isinstance(other, Record) and other.dedupe_key != out.dedupe_key


@pytest.mark.parametrize(
    ("body", "kind", "path", "expected", "found"),
    [
        (good(schema_version=9), "unknown_version", "$.schema_version", "integer 1..3", 9),
        (
            good(schema_version=None),
            "unknown_version",
            "$.schema_version",
            "integer 1..3",
            "missing",
        ),
        (good(entity_id=None), "required", "$.entity_id", "string", "missing"),
        (good(attributes=None), "required", "$.attributes", "object", "missing"),
        (good(attributes=attrs(amount="12.5")), "type", "$.attributes.amount", "number", "string"),
        (good(revision="7"), "type", "$.revision", "integer", "string"),
        (good(revision=1.5), "type", "$.revision", "integer", "number"),
        (good(deleted="no"), "type", "$.deleted", "boolean", "string"),
        (good(relations={}), "type", "$.relations", "array", "object"),
        (good(extra=1), "additionalProperties", "$.extra", "no such field", "integer"),
        (
            good(relations=[{"type": "OWNS", "target_type": "x"}]),
            "required",
            "$.relations[0].target_id",
            "string",
            "missing",
        ),
    ],
)
def test_shape_problems_are_schema_drift(
    body: dict[str, Any], kind: str, path: str, expected: str, found: Any
) -> None:
    out = fail(raw(body))
    assert out.reason is DRIFT
    d = out.detail
    assert (d["kind"], d["path"], d["expected"], d["found"]) == (kind, path, expected, found)
    assert d["message"] and d["errors"][0]["path"] == path
    assert out.body is not None


@pytest.mark.parametrize(
    ("body", "kind", "path", "expected"),
    [
        (good(attributes=attrs(amount=-1)), "minimum", "$.attributes.amount", ">= 0"),
        (good(attributes=attrs(quantity=-3)), "minimum", "$.attributes.quantity", ">= 0"),
        (good(revision=-1), "minimum", "$.revision", ">= 0"),
        (good(attributes=attrs(currency="eur")), "pattern", "$.attributes.currency", "^[A-Z]{3}$"),
        (good(attributes=attrs(email="nope")), "format", "$.attributes.email", "email"),
        (good(attributes=attrs(name="x" * 513)), "maxLength", "$.attributes.name", "length <= 512"),
        (good(entity_id=""), "minLength", "$.entity_id", "length >= 1"),
        (good(entity_type="Order"), "pattern", "$.entity_type", "^[a-z][a-z0-9_]{0,63}$"),
        (good(priority="urgent"), "enum", "$.priority", ["high", "normal", "low"]),
        (good(occurred_at="yesterday"), "format", "$.occurred_at", "date-time"),
        (
            good(relations=[{"type": "owns", "target_type": "x", "target_id": "1"}]),
            "pattern",
            "$.relations[0].type",
            "^[A-Z][A-Z0-9_]*$",
        ),
        (
            good(occurred_at="2024-05-02T12:00:01Z"),
            "future",
            "$.occurred_at",
            "at most 24h in the future",
        ),
    ],
)
def test_value_problems_are_validation_fail(
    body: dict[str, Any], kind: str, path: str, expected: Any
) -> None:
    out = fail(raw(body))
    assert out.reason is VALUE
    assert (out.detail["kind"], out.detail["path"], out.detail["expected"]) == (
        kind,
        path,
        expected,
    )
    assert out.detail["schema_version"] == 3


def test_within_24h_in_the_future_is_fine() -> None:
    out = Decoder(now=lambda: NOW).decode(raw(good(occurred_at="2024-05-02T11:59:59Z")))
    assert isinstance(out, Record)
    offset = Decoder(now=lambda: NOW).decode(raw(good(occurred_at="2024-05-02T13:59:59+02:00")))
    assert isinstance(offset, Record)


def test_renamed_field_is_drift_reporting_both_sides() -> None:
    body = good()
    body["entityId"] = body.pop("entity_id")
    out = fail(raw(body))
    assert out.reason is DRIFT
    assert out.detail["path"] == "$.entity_id" and out.detail["kind"] == "required"
    assert {(e["kind"], e["path"]) for e in out.detail["errors"]} == {
        ("required", "$.entity_id"),
        ("additionalProperties", "$.entityId"),
    }


def test_drift_is_reported_before_value_errors_and_errors_are_bounded() -> None:
    many = {f"a{i}": 1 for i in range(30)}
    body = good(revision=-1, attributes=attrs(amount="x", currency="x"), **many)
    out = fail(raw(body))
    assert out.reason is DRIFT
    errors = out.detail["errors"]
    assert len(errors) == 10
    assert all(e["kind"] in ("type", "additionalProperties") for e in errors)
    assert out.detail["kind"] == "additionalProperties"  # ranked before type; then by path
    assert out.detail["path"] == "$.a0"


def test_tenant_must_match_the_route() -> None:
    out = fail(raw(good(), tenant="globex"))
    assert out.reason is VALUE
    d = out.detail
    assert (d["kind"], d["path"], d["expected"], d["found"]) == (
        "tenant_mismatch",
        "$.tenant_id",
        "globex",
        "acme",
    )


@pytest.mark.parametrize(
    ("data", "kind", "found"),
    [
        (b"{not json", "json", "unparseable bytes"),
        (b'{"a": "\xff"}', "utf8", "unparseable bytes"),
        (b"[1, 2]", "json", "array"),
        (b'"text"', "json", "string"),
        (b"", "json", "unparseable bytes"),
    ],
)
def test_malformed_bytes_are_validation_fail(data: bytes, kind: str, found: str) -> None:
    out = fail(raw(data=data))
    assert out.reason is VALUE
    assert (out.detail["kind"], out.detail["path"], out.detail["found"]) == (kind, "$", found)
    assert out.body is None and out.detail["schema_version"] is None


def test_size_limit() -> None:
    body = good(attributes=attrs(note="x" * 200))
    out = fail(raw(body), Decoder(max_record_bytes=100, now=lambda: NOW))
    assert out.reason is VALUE and out.detail["kind"] == "size"
    assert out.detail["found"] == len(orjson.dumps(body))


def test_source_reject_is_passed_through() -> None:
    r = raw(data=b"a,b", meta={"reject": {"kind": "csv", "message": "CSV row has 2 columns"}})
    out = fail(r)
    assert out.reason is VALUE
    assert (out.detail["kind"], out.detail["message"]) == ("csv", "CSV row has 2 columns")
    assert out.detail["errors"][0]["kind"] == "csv"


def test_csv_decoded_body_is_used_without_parsing() -> None:
    out = Decoder(now=lambda: NOW).decode(raw(data=b"3,acme,...", decoded=good()))
    assert isinstance(out, Record) and out.entity_id == "o-1"
    bad = fail(raw(data=b"3,acme,...", decoded=good(revision="seven")))
    assert bad.reason is DRIFT and bad.detail["path"] == "$.revision"


def test_older_versions_upgrade_and_report_their_version() -> None:
    v2 = {k: v for k, v in good().items() if k != "schema_version"}
    v2["schema_version"] = 2
    v2["attributes"] = attrs(_deleted=True)
    out = Decoder(now=lambda: NOW).decode(raw(v2))
    assert isinstance(out, Record) and out.deleted is True
    assert "_deleted" not in out.body["attributes"]
    v2["attributes"] = attrs(amount="1")
    bad = fail(raw(v2))
    assert bad.reason is DRIFT and bad.detail["schema_version"] == 2
    assert bad.body is not None and bad.body["entity_id"] == "o-1"


def test_decode_many_keeps_order_and_reads_the_clock_once() -> None:
    calls = []

    def clock() -> float:
        calls.append(1)
        return NOW

    decoder = Decoder(now=clock)
    results = decoder.decode_many([raw(good()), raw(data=b"x"), raw(good(revision=9))])
    assert [type(r) for r in results] == [Record, DecodeFailure, Record]
    assert len(calls) == 1
