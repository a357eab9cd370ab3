"""Validating an upgraded body against input.schema.json, and classifying what failed.

The line between the two reason codes is drawn by JSON Schema keyword:
`required`, `additionalProperties`, `type` and `const` mean the SHAPE is wrong (SCHEMA_DRIFT:
the sender's schema changed); every other keyword means a VALUE is wrong (VALIDATION_FAIL: bad
data in the right shape). The compiled validator is built once; `is_valid` is the fast path
and the (slower) error iteration only runs for records that already failed.
"""

from __future__ import annotations

import re
from itertools import islice
from typing import Any

import jsonschema_rs

from ingest.records import ReasonCode
from ingest.schema import json_type, load_schema

DRIFT_KEYWORDS = ("required", "additionalProperties", "type", "const")
MAX_ERRORS = 10
_SCAN_LIMIT = 100  # errors looked at before sorting: bounds the work on a pathological record
_FOUND_CHARS = 100
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXPECT_PREFIX = {
    "minimum": ">= ",
    "maximum": "<= ",
    "exclusiveMinimum": "> ",
    "exclusiveMaximum": "< ",
    "minLength": "length >= ",
    "maxLength": "length <= ",
    "minItems": "items >= ",
    "maxItems": "items <= ",
}


def json_path(parts: Any) -> str:
    """`['attributes', 'amount']` -> `$.attributes.amount`; indexes as `[0]`."""
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.match(part):
            out += f".{part}"
        else:
            out += f"[{part!r}]"
    return out


def is_drift(detail: dict[str, Any]) -> bool:
    return detail["kind"] in DRIFT_KEYWORDS or detail["kind"] == "unknown_version"


def reason_for(details: list[dict[str, Any]]) -> ReasonCode:
    return ReasonCode.SCHEMA_DRIFT if is_drift(details[0]) else ReasonCode.VALIDATION_FAIL


class SchemaValidator:
    """The compiled envelope schema (format checking on: date-time, email)."""

    def __init__(self, schema: dict[str, Any] | None = None) -> None:
        self._schema = schema if schema is not None else load_schema()
        self._validator = jsonschema_rs.validator_for(self._schema, validate_formats=True)
        self.is_valid = self._validator.is_valid

    def errors(self, body: Any) -> list[dict[str, Any]]:
        """All problems, drift first, then by path; at most MAX_ERRORS. Empty when valid."""
        details: list[dict[str, Any]] = []
        for err in islice(self._validator.iter_errors(body), _SCAN_LIMIT):
            details.extend(self._describe(err))
        details.sort(key=_order)
        return details[:MAX_ERRORS]

    def _describe(self, err: Any) -> list[dict[str, Any]]:
        keyword = str(err.schema_path[-1]) if err.schema_path else "schema"
        at = list(err.instance_path)
        rule = _node(self._schema, err.schema_path)
        if keyword == "required":
            name = err.kind.property
            parent = _node(self._schema, err.schema_path[:-1])
            declared = parent.get("properties", {}).get(name, {}).get("type", "present")
            return [
                _detail(
                    "required",
                    json_path([*at, name]),
                    declared,
                    "missing",
                    f"required field '{name}' is missing",
                )
            ]
        if keyword == "additionalProperties":
            return [
                _detail(
                    keyword,
                    json_path([*at, name]),
                    "no such field",
                    json_type(err.instance[name]),
                    f"unknown field '{name}' (renamed, or new in the sender's schema?)",
                )
                for name in err.kind.unexpected
            ]
        found = json_type(err.instance)
        if keyword == "type":
            expected = "|".join(rule) if isinstance(rule, list) else rule
            message = f"'{json_path(at)}' is {found}, expected {expected}"
            return [_detail(keyword, json_path(at), expected, found, message)]
        expected = f"{_EXPECT_PREFIX[keyword]}{rule}" if keyword in _EXPECT_PREFIX else rule
        return [
            _detail(keyword, json_path(at), expected, _shown(err.instance), _short(err.message))
        ]


def _node(schema: Any, path: Any) -> Any:
    for part in path:
        schema = schema[part]
    return schema


def _detail(kind: str, path: str, expected: Any, found: Any, message: str) -> dict[str, Any]:
    return {"kind": kind, "path": path, "expected": expected, "found": found, "message": message}


def _order(detail: dict[str, Any]) -> tuple[int, int, str]:
    kind = detail["kind"]
    rank = DRIFT_KEYWORDS.index(kind) if kind in DRIFT_KEYWORDS else len(DRIFT_KEYWORDS)
    return (0 if rank < len(DRIFT_KEYWORDS) else 1, rank, detail["path"])


def json_safe(value: Any) -> Any:
    """`value`, or its digits as a string when it is an integer no 64-bit field holds: DLQ
    details are stored as JSON (orjson), which refuses integers outside -2^63..2^64-1."""
    if type(value) is int and not -(2**63) <= value <= 2**64 - 1:
        text = str(value)
        return text if len(text) <= _FOUND_CHARS else text[:_FOUND_CHARS] + "…"
    return value


def _shown(value: Any) -> Any:
    """The offending value, kept small: scalars as-is (long strings cut), containers by type."""
    if type(value) is int:
        return json_safe(value)
    if isinstance(value, str):
        return value if len(value) <= _FOUND_CHARS else value[:_FOUND_CHARS] + "…"
    if isinstance(value, list | dict):
        return json_type(value)
    return value


def _short(message: str) -> str:
    return message if len(message) <= 300 else message[:300] + "…"
