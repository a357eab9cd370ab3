"""input.schema.json itself, and the keyword -> reason split the validator applies."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest

from ingest.records import ReasonCode
from ingest.schema import declared_types, json_type, load_schema
from ingest.schema.validate import DRIFT_KEYWORDS, SchemaValidator, json_path, reason_for

V3: dict[str, Any] = {
    "schema_version": 3,
    "tenant_id": "acme",
    "entity_type": "order",
    "entity_id": "o-1",
    "revision": 0,
    "occurred_at": "2024-05-01T11:00:00.250+02:00",
    "attributes": {"anything": {"nested": [1, None]}},
}


def test_schema_is_valid_draft_2020_12_and_closed_at_top_level() -> None:
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert jsonschema_rs.meta.is_valid(schema)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {
        "schema_version",
        "tenant_id",
        "entity_type",
        "entity_id",
        "revision",
        "occurred_at",
        "attributes",
    }


def test_declared_types_drive_csv_coercion() -> None:
    top, attrs = declared_types()
    assert top["revision"] == "integer" and top["deleted"] == "boolean"
    assert top["relations"] == "array" and top["occurred_at"] == "string"
    assert attrs == {
        "amount": "number",
        "currency": "string",
        "email": "string",
        "name": "string",
        "quantity": "integer",
        "status": "string",
    }


def test_minimal_record_and_open_attributes_are_valid() -> None:
    v = SchemaValidator()
    assert v.is_valid(V3) and v.errors(V3) == []
    assert not v.is_valid({**V3, "schema_version": 2})
    assert v.errors({**V3, "schema_version": 2})[0]["kind"] == "const"


@pytest.mark.parametrize(
    ("change", "reason", "kind"),
    [
        ({"revision": "1"}, ReasonCode.SCHEMA_DRIFT, "type"),
        ({"attributes": {"quantity": 1.5}}, ReasonCode.SCHEMA_DRIFT, "type"),
        ({"attributes": {"amount": True}}, ReasonCode.SCHEMA_DRIFT, "type"),
        ({"tenant": "acme"}, ReasonCode.SCHEMA_DRIFT, "additionalProperties"),
        ({"schema_version": 4}, ReasonCode.SCHEMA_DRIFT, "const"),
        ({"revision": 2**63}, ReasonCode.VALIDATION_FAIL, "maximum"),
        ({"tenant_id": "-acme"}, ReasonCode.VALIDATION_FAIL, "pattern"),
        ({"entity_id": "x" * 257}, ReasonCode.VALIDATION_FAIL, "maxLength"),
        ({"occurred_at": "2024-05-01 11:00"}, ReasonCode.VALIDATION_FAIL, "format"),
        ({"priority": "LOW"}, ReasonCode.VALIDATION_FAIL, "enum"),
    ],
)
def test_keyword_decides_the_reason(change: dict[str, Any], reason: ReasonCode, kind: str) -> None:
    errors = SchemaValidator().errors({**V3, **change})
    assert errors[0]["kind"] == kind
    assert reason_for(errors) is reason


def test_drift_keywords_are_exactly_the_shape_ones() -> None:
    assert set(DRIFT_KEYWORDS) == {"required", "additionalProperties", "type", "const"}


def test_long_values_are_cut_and_containers_named() -> None:
    errors = SchemaValidator().errors({**V3, "entity_type": "Y" * 500, "priority": ["x"]})
    by_kind = {e["kind"]: e for e in errors}
    assert by_kind["pattern"]["found"] == "Y" * 100 + "…"
    assert by_kind["type"]["found"] == "array" and by_kind["type"]["path"] == "$.priority"


@pytest.mark.parametrize(
    ("parts", "path"),
    [
        ([], "$"),
        (["attributes", "amount"], "$.attributes.amount"),
        (["relations", 0, "type"], "$.relations[0].type"),
        (["attributes", "a b"], "$.attributes['a b']"),
    ],
)
def test_json_path(parts: list[Any], path: str) -> None:
    assert json_path(parts) == path


def test_json_type() -> None:
    values: list[Any] = [None, True, 1, 1.0, "", [], {}]
    assert [json_type(v) for v in values] == [
        "null",
        "boolean",
        "integer",
        "number",
        "string",
        "array",
        "object",
    ]
