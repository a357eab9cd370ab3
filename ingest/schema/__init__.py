"""The record envelope schema (`input.schema.json`) and the facts other modules read from it.

The JSON file is the single source of truth: the validator compiles it, and the CSV reader
takes its column types from it, so a new typed attribute is added in one place.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import orjson

from ingest.records import ReasonCode

SCHEMA_PATH = Path(__file__).with_name("input.schema.json")


@cache
def load_schema() -> dict[str, Any]:
    """The parsed schema (cached: read once per process)."""
    schema: dict[str, Any] = orjson.loads(SCHEMA_PATH.read_bytes())
    return schema


def declared_types() -> tuple[dict[str, str], dict[str, str]]:
    """JSON types of the top-level fields and of the known attributes, by name."""
    props: dict[str, Any] = load_schema()["properties"]
    top = {name: str(spec["type"]) for name, spec in props.items()}
    attrs = {name: str(spec["type"]) for name, spec in props["attributes"]["properties"].items()}
    return top, attrs


def json_type(value: Any) -> str:
    """The JSON type name of a parsed value, as JSON Schema's `type` keyword spells it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class EnvelopeError(Exception):
    """A record the schema machinery refuses, with the JSON path and what was expected there.

    Raised by transformers (which cannot use the validator on an old shape); the decoder turns
    it into a `DecodeFailure` with `reason` and `detail()`.
    """

    reason: ReasonCode = ReasonCode.VALIDATION_FAIL

    def __init__(self, kind: str, path: str, expected: Any, found: Any, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path
        self.expected = expected
        self.found = found
        self.message = message

    def detail(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "expected": self.expected,
            "found": self.found,
            "message": self.message,
        }


class DriftError(EnvelopeError):
    """The shape is wrong: a field missing, renamed, retyped, or an unknown schema_version."""

    reason = ReasonCode.SCHEMA_DRIFT


class ValueRuleError(EnvelopeError):
    """The shape is right but a value breaks a rule (e.g. a v1 `ts` no calendar can hold)."""

    reason = ReasonCode.VALIDATION_FAIL
