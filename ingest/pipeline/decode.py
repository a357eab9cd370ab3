"""Bytes -> validated current-version `Record`, or a classified `DecodeFailure`.

This is where every record's problems are classified exactly once: SCHEMA_DRIFT when the shape
is wrong (see ingest/schema/validate.py for the keyword split), VALIDATION_FAIL when a value is
wrong or the bytes are not a JSON object at all. It runs for every record, so the valid path
does only: parse, version check, defaults, one compiled `is_valid`, two rule checks, hash.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from ingest.records import RawRecord, ReasonCode, Record, dedupe_key
from ingest.schema import EnvelopeError, json_type
from ingest.schema.validate import SchemaValidator, reason_for
from ingest.transformers import CURRENT_VERSION, upgrade

FUTURE_LIMIT_SECONDS = 24 * 3600


@dataclass(slots=True)
class DecodeFailure:
    """Why a record cannot enter the pipeline; `detail` is what the DLQ row stores.

    detail: kind, path (JSON path), expected, found, message, schema_version (as sent, or
    None), errors (up to 10 dicts shaped like the first). `body` is the parsed (upgraded when
    possible) body, for the DLQ row's entity columns; None when the bytes did not parse.
    """

    reason: ReasonCode
    detail: dict[str, Any]
    body: dict[str, Any] | None


class Decoder:
    """Stateless apart from the compiled schema: build one per process and share it."""

    def __init__(
        self,
        max_record_bytes: int = 1_048_576,
        now: Callable[[], float] = time.time,
        extra: Sequence[Callable[[dict[str, Any]], dict[str, Any]]] = (),
    ) -> None:
        self._max = max_record_bytes
        self._extra = tuple(extra)  # config `transformers`: repairs after upgrade
        self._now = now
        self._validator = SchemaValidator()
        self._is_valid = self._validator.is_valid

    def decode(self, raw: RawRecord) -> Record | DecodeFailure:
        return self._decode(raw, self._now() + FUTURE_LIMIT_SECONDS)

    def decode_many(self, raws: Sequence[RawRecord]) -> list[Record | DecodeFailure]:
        """One clock read per batch; results in input order."""
        horizon = self._now() + FUTURE_LIMIT_SECONDS
        decode = self._decode
        return [decode(raw, horizon) for raw in raws]

    def _decode(self, raw: RawRecord, horizon: float) -> Record | DecodeFailure:
        if raw.meta and "reject" in raw.meta:
            return _rejected(raw.meta["reject"])
        if len(raw.data) > self._max:
            return _failure(
                ReasonCode.VALIDATION_FAIL,
                "size",
                "$",
                f"<= {self._max} bytes",
                len(raw.data),
                f"record is {len(raw.data)} bytes, over the {self._max}-byte limit",
            )
        body = raw.decoded
        if body is None:
            try:
                body = orjson.loads(raw.data)
            except orjson.JSONDecodeError as exc:
                kind = "utf8" if "UTF-8" in str(exc) else "json"
                return _failure(
                    ReasonCode.VALIDATION_FAIL,
                    kind,
                    "$",
                    "a JSON object",
                    "unparseable bytes",
                    f"not valid JSON: {exc}",
                )
            if type(body) is not dict:
                found = json_type(body)
                return _failure(
                    ReasonCode.VALIDATION_FAIL,
                    "json",
                    "$",
                    "object",
                    found,
                    f"a record must be a JSON object, got {found}",
                )
        sent_version = body.get("schema_version")
        if sent_version != CURRENT_VERSION or type(sent_version) is not int:
            try:
                body = upgrade(body)
            except EnvelopeError as exc:
                return _failure(exc.reason, *_fields(exc.detail()), body=body, version=sent_version)
        if self._extra:
            repaired = _repair(self._extra, body, sent_version)
            if isinstance(repaired, DecodeFailure):
                return repaired
            body = repaired
        if "priority" not in body:
            body["priority"] = "normal"
        if "relations" not in body:
            body["relations"] = []
        if "deleted" not in body:
            body["deleted"] = False
        if not self._is_valid(body):
            errors = self._validator.errors(body)
            first = errors[0]
            return DecodeFailure(
                reason_for(errors),
                {**first, "schema_version": sent_version, "errors": errors},
                body,
            )
        if body["tenant_id"] != raw.tenant:
            return _failure(
                ReasonCode.VALIDATION_FAIL,
                "tenant_mismatch",
                "$.tenant_id",
                raw.tenant,
                body["tenant_id"],
                f"tenant_id '{body['tenant_id']}' does not match the tenant of its route "
                f"'{raw.tenant}'",
                body=body,
                version=sent_version,
            )
        occurred = body["occurred_at"]
        try:
            when = datetime.fromisoformat(occurred).timestamp()
        except ValueError:
            return _failure(
                ReasonCode.VALIDATION_FAIL,
                "format",
                "$.occurred_at",
                "date-time",
                occurred,
                f"occurred_at '{occurred}' is not a date-time this service can read",
                body=body,
                version=sent_version,
            )
        if when > horizon:
            return _failure(
                ReasonCode.VALIDATION_FAIL,
                "future",
                "$.occurred_at",
                "at most 24h in the future",
                occurred,
                f"occurred_at '{occurred}' is more than 24h in the future",
                body=body,
                version=sent_version,
            )
        return Record(raw, body, dedupe_key(body))


def _repair(
    extra: Sequence[Callable[[dict[str, Any]], dict[str, Any]]],
    body: dict[str, Any],
    version: Any,
) -> dict[str, Any] | DecodeFailure:
    """Run the config's repair functions in order; one that raises or returns a non-dict is
    SCHEMA_DRIFT (kind `transformer`) for that record, never a crashed worker."""
    for fn in extra:
        name = f"{fn.__module__}:{getattr(fn, '__qualname__', fn)}"
        try:
            out = fn(body)
        except EnvelopeError as exc:
            return _failure(exc.reason, *_fields(exc.detail()), body=body, version=version)
        except Exception as exc:
            return _failure(
                ReasonCode.SCHEMA_DRIFT,
                "transformer",
                "$",
                "a repaired record",
                type(exc).__name__,
                f"transformer {name} failed: {exc}",
                body=body,
                version=version,
            )
        if type(out) is not dict:
            return _failure(
                ReasonCode.SCHEMA_DRIFT,
                "transformer",
                "$",
                "object",
                json_type(out),
                f"transformer {name} did not return an object",
                body=body,
                version=version,
            )
        body = out
    return body


def _fields(detail: dict[str, Any]) -> tuple[Any, ...]:
    return (detail["kind"], detail["path"], detail["expected"], detail["found"], detail["message"])


def _failure(
    reason: ReasonCode,
    kind: str,
    path: str,
    expected: Any,
    found: Any,
    message: str,
    *,
    body: dict[str, Any] | None = None,
    version: Any = None,
) -> DecodeFailure:
    first = {"kind": kind, "path": path, "expected": expected, "found": found, "message": message}
    version = version if type(version) is int else None
    return DecodeFailure(reason, {**first, "schema_version": version, "errors": [first]}, body)


def _rejected(reject: Any) -> DecodeFailure:
    """A source already knew these bytes are unreadable (corrupt gzip, ragged CSV row...)."""
    given = reject if isinstance(reject, dict) else {"message": str(reject)}
    first = {
        "kind": str(given.get("kind", "unreadable")),
        "path": str(given.get("path", "$")),
        "expected": given.get("expected"),
        "found": given.get("found"),
        "message": str(given.get("message", "the source could not read this record")),
    }
    detail = {**given, **first, "schema_version": None, "errors": [first]}
    return DecodeFailure(ReasonCode.VALIDATION_FAIL, detail, None)
