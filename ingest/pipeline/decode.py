"""Bytes -> validated current-version `Record`, or a classified `DecodeFailure`.

This is where every record's problems are classified exactly once: SCHEMA_DRIFT when the shape
is wrong (see ingest/schema/validate.py for the keyword split), VALIDATION_FAIL when a value is
wrong or the bytes are not a JSON object at all.

Two paths. The fast path (`ingest/schema/fast.py`) decodes current-version bytes straight into
a typed Struct compiled from the schema, checks the few rules left (tenant, known attributes,
occurred_at, at most one jsonschema format call per distinct timestamp), builds the body and
hashes it: no dict walk, no error machinery. Anything it does not accept, for whatever reason,
goes through the slow path, the full classifier, which alone decides what is wrong and how to
say it; the fast path never accepts a record the slow path would refuse (property-tested).

Integers are parsed exactly (msgspec keeps big integers as ints; orjson would turn them into
floats and lose digits). One beyond 64 bits (outside -2^63..2^64-1, what the canonical
encoding and every sink keep exactly) is refused as VALIDATION_FAIL `range`, never altered.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import orjson

from ingest.records import RawRecord, ReasonCode, Record, dedupe_key
from ingest.schema import EnvelopeError, json_type, load_schema
from ingest.schema.fast import FastSchema
from ingest.schema.validate import SchemaValidator, json_path, json_safe, reason_for
from ingest.transformers import CURRENT_VERSION, upgrade

FUTURE_LIMIT_SECONDS = 24 * 3600
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what orjson (the canonical encoding) keeps exactly
_TIMES_KEPT = 4096  # occurred_at strings remembered (parsed time, or not a date-time)
_SORTED = orjson.OPT_SORT_KEYS
_json_loads = msgspec.json.Decoder().decode  # exact integers, unlike orjson
_DecodeError = msgspec.DecodeError
_sha256 = hashlib.sha256
log = logging.getLogger(__name__)
Bodies = bool | Callable[[str, str], bool]  # `Decoder(bodies=...)`
NativeDecode = Callable[
    [list[RawRecord], type[Record], dict[str, float], float, int, bool, bool, bool, Bodies], Any
]


def _load_native() -> tuple[NativeDecode | None, str, str]:
    """The compiled fast path (`ingest_native`, built from ingest_native/ by `make install`),
    or None and why not; with the schema fingerprint it was written for."""
    if os.environ.get("INGEST_NO_EXTENSION"):
        return None, "INGEST_NO_EXTENSION is set", ""
    try:
        import ingest_native  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        return (
            None,
            f"the compiled extension is not installed ({exc}; `make install` builds it)",
            "",
        )
    decode: NativeDecode = ingest_native.decode_records
    return decode, "", str(ingest_native.SCHEMA_SHA256)


_NATIVE, _NATIVE_MISSING, _NATIVE_SCHEMA = _load_native()
_logged: set[str] = set()


def _schema_fingerprint() -> str:
    return hashlib.sha256(orjson.dumps(load_schema(), option=orjson.OPT_SORT_KEYS)).hexdigest()


def _say_once(level: int, message: str) -> None:
    """The decoder's path, logged once per process (at start-up: the factory builds the one
    Decoder of a process), never silent."""
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


@dataclass(slots=True, frozen=True)
class BatchFacts:
    """What the worker's per-batch bookkeeping reads of a batch whose every answer is a
    `Record` the compiled path finished, gathered by it while it built them (`decode_batch`):
    each pass of the event loop over a 5,000-record batch (keys, entity keys, routes) missed
    the CPU's cache on every record, 65-410 ns a record a pass. Only for such batches: one
    failure, one record the Python side finished, and there are no facts (the worker then
    takes its per-record path)."""

    keys: list[bytes]  # every record's dedupe_key, in order (a list of its own)
    entities: set[tuple[str, str, str]]  # their entity keys
    unique: bool  # no dedupe_key twice
    tenant: str | None  # the one every record has, else None
    entity_type: str | None  # likewise
    # the raws' source and event time when every raw holds the very same object (a source
    # gives a batch's raws its one name, and a file's raws its one time), else None: the
    # settle's label counts and lag observations then need no pass over the raws
    source: str | None = None
    event_time: float | None = None


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
        native: bool = True,
        postgres_rows: bool = True,
        sqlite_rows: bool = False,
        bodies: Bodies = False,
    ) -> None:
        self._max = max_record_bytes
        # the compiled path also writes each record's Postgres row (`Record.copy_row`, ~0.6 µs
        # a record): worth it only when a Postgres sink will send it
        self._rows = postgres_rows
        # and the SQLite sink's row (`Record.sqlite_row`): a tuple of objects the record holds
        # anyway and two slices of the canonical bytes, cheaper than `row_of` in the sink
        self._sqlite_rows = sqlite_rows
        # and each record's body, for routes whose sinks read it (Typesense, Neo4j: the
        # factory's `bodies_for`): True for all, or (tenant, entity_type) -> bool. Left out, a
        # body is built from the bytes when first read (`Record.body`), which costs twice
        # what building it here does; no SQLite or Postgres sink reads it
        self._bodies = bodies
        self._extra = tuple(extra)  # config `transformers`: repairs after upgrade
        self._now = now
        self._validator = SchemaValidator()
        self._is_valid = self._validator.is_valid
        self._fast = FastSchema()
        self._times: dict[str, float] = {}  # occurred_at -> epoch seconds (inf: not valid)
        self._native, self.path = self._native_path(native)

    def _native_path(self, wanted: bool) -> tuple[NativeDecode | None, str]:
        """The compiled fast path when it is installed, wanted, and written for this schema
        and fast path; else None. Logs which path runs (a warning when it is missing)."""
        if not wanted:
            return None, "python"
        why = _NATIVE_MISSING
        if _NATIVE is not None:
            if not self._fast.enabled or self._extra:
                return None, "python"  # the slow path only: nothing compiled would run
            if _schema_fingerprint() != _NATIVE_SCHEMA:
                why = "the schema is not the one the extension was written for"
            elif tuple(p for p, _ in self._fast.patterned) != ("tenant_id", "entity_type"):
                why = "the fast path's patterned fields changed"
            else:
                _say_once(logging.INFO, "decoder: compiled fast path (ingest_native)")
                return _NATIVE, "compiled"
        level = logging.INFO if os.environ.get("INGEST_NO_EXTENSION") else logging.WARNING
        _say_once(level, f"decoder: pure-Python fast path: {why}")
        return None, "python"

    def decode(self, raw: RawRecord) -> Record | DecodeFailure:
        return self.decode_many([raw])[0]

    def decode_many(self, raws: Sequence[RawRecord]) -> list[Record | DecodeFailure]:
        """One clock read per batch; results in input order."""
        return self.decode_batch(raws, facts=False)[0]

    def decode_batch(
        self, raws: Sequence[RawRecord], *, facts: bool = True
    ) -> tuple[list[Record | DecodeFailure], BatchFacts | None]:
        """`decode_many`, with the batch's `BatchFacts` when the compiled path finished every
        record of it (else None).

        The loop is the fast path written out flat (it runs for every record: each call or
        attribute lookup saved here is saved a million times); `_decode` is the slow path.
        """
        horizon = self._now() + FUTURE_LIMIT_SECONDS
        slow = self._decode
        fast = self._fast
        if not fast.enabled or self._extra:  # repair functions may change anything: no fast path
            return [slow(raw, horizon) for raw in raws], None
        typed = fast.decode
        attributes_ok = fast.attributes_ok
        strings_ok = fast.strings_ok
        strings_of = fast.strings_of
        good_strings = fast.good_strings
        times = self._times
        if len(times) > _TIMES_KEPT:
            times.clear()
        limit = self._max
        dumps = orjson.dumps
        out: list[Record | DecodeFailure] = []
        append = out.append
        native = self._native
        hits: Any = _NONE
        if native is not None:
            batch = raws if type(raws) is list else list(raws)
            rows, lite, bodies = self._rows, self._sqlite_rows, self._bodies
            hits = native(batch, Record, times, horizon, limit, rows, lite, facts, bodies)
            if facts:
                hits, found = hits
                if found is not None:  # every answer a finished Record: what the loop keeps
                    return hits, BatchFacts(*found)
        for raw, hit in zip(raws, hits, strict=False):  # hits: one per raw, or endless None
            if hit.__class__ is Record:  # the compiled path did every check
                append(hit)
                continue
            data = raw.data
            if raw.decoded is not None or raw.meta or len(data) > limit:
                append(slow(raw, horizon))
                continue
            if hit is not None:  # the compiled path: shape checked, body built and hashed
                (body, key, tenant, entity_type, entity_id, revision, occurred, deleted,
                 priority, attributes, copy_row, sqlite_row) = hit  # fmt: skip
                when = times.get(occurred)
                if when is None:
                    when = times[occurred] = self._time_of(occurred)
                if (
                    tenant != raw.tenant
                    or when > horizon
                    or (
                        (tenant, entity_type) not in good_strings
                        and not strings_ok(_Strings(tenant, entity_type))
                    )
                    or (attributes and not attributes_ok(attributes))
                ):
                    append(slow(raw, horizon))
                    continue
                append(
                    Record(
                        raw,
                        body,
                        key,
                        tenant,
                        entity_type,
                        entity_id,
                        revision,
                        (tenant, entity_type, entity_id),
                        deleted,
                        priority,
                        copy_row,
                        sqlite_row,
                    )
                )
                continue
            try:
                env: Any = typed(data)
            except (_DecodeError, RecursionError):  # deep nesting: the slow path refuses it
                append(slow(raw, horizon))
                continue
            tenant = env.tenant_id
            attributes = env.attributes
            occurred = env.occurred_at
            when = times.get(occurred)
            if when is None:
                when = times[occurred] = self._time_of(occurred)
            if (
                tenant != raw.tenant
                or when > horizon
                or (strings_of(env) not in good_strings and not strings_ok(env))
                or (attributes and not attributes_ok(attributes))
            ):
                append(slow(raw, horizon))
                continue
            relations = env.relations
            if relations:
                relations = [
                    {"type": r.type, "target_type": r.target_type, "target_id": r.target_id}
                    for r in relations
                ]
            entity_type = env.entity_type
            entity_id = env.entity_id
            revision = env.revision
            deleted = env.deleted
            priority = env.priority
            # The keys in sorted order: the canonical form sorts them anyway (OPT_SORT_KEYS
            # stays, so the bytes are the same whatever the order), and a sorted list sorts
            # faster. Nothing reads the body's top-level order (sinks pick fields by name).
            body = {
                "attributes": attributes,
                "deleted": deleted,
                "entity_id": entity_id,
                "entity_type": entity_type,
                "occurred_at": occurred,
                "priority": priority,
                "relations": relations,
                "revision": revision,
                "schema_version": CURRENT_VERSION,
                "tenant_id": tenant,
            }
            try:
                canonical = dumps(body, None, _SORTED)  # positional: a cheaper call
            except orjson.JSONEncodeError:  # an integer beyond 64 bits: the slow path says where
                append(slow(raw, horizon))
                continue
            append(
                Record(
                    raw,
                    body,
                    _sha256(canonical).digest(),
                    tenant,
                    entity_type,
                    entity_id,
                    revision,
                    (tenant, entity_type, entity_id),
                    deleted,
                    priority,
                )
            )
        return out, None

    def _time_of(self, occurred: str) -> float:
        """Epoch seconds of a valid date-time (the schema's format), else +inf (slow path)."""
        if not self._fast.date_time(occurred):
            return math.inf
        try:
            return datetime.fromisoformat(occurred).timestamp()
        except ValueError:
            return math.inf

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
                body = _json_loads(raw.data)
            except RecursionError:
                return _too_deep()
            except _DecodeError as exc:
                kind, why = _unparseable(raw.data, exc)
                return _failure(
                    ReasonCode.VALIDATION_FAIL,
                    kind,
                    "$",
                    "a JSON object",
                    "unparseable bytes",
                    f"not valid JSON: {why}",
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
        try:
            valid = self._is_valid(body)
            errors = [] if valid else self._validator.errors(body)
        except (RecursionError, ValueError) as exc:  # jsonschema_rs: "Recursion limit reached"
            if "ecursion" not in str(exc):
                raise
            return _too_deep(body, sent_version)
        if not valid:
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
        try:
            key = dedupe_key(body)
        except orjson.JSONEncodeError:
            path, value = _beyond_64_bits(body)
            if not path:  # no such integer: nested deeper than the encoder goes
                return _too_deep(body, sent_version)
            return _failure(
                ReasonCode.VALIDATION_FAIL,
                "range",
                path,
                f"an integer within {INT_MIN}..{INT_MAX}",
                json_safe(value),
                f"integer at {path} is beyond 64 bits: refused rather than stored altered",
                body=body,
                version=sent_version,
            )
        return Record.of(raw, body, key)


MAX_DEPTH = 254  # nesting orjson (the sinks' and the dedupe key's encoder) can write


def _too_deep(body: dict[str, Any] | None = None, version: Any = None) -> DecodeFailure:
    """A record nested deeper than can be read or stored (issue 11's fuzz found it raising)."""
    return _failure(
        ReasonCode.VALIDATION_FAIL,
        "depth",
        "$",
        f"JSON nested at most {MAX_DEPTH} levels",
        "deeper",
        f"the record is nested deeper than {MAX_DEPTH} levels: refused, it cannot be stored",
        body=body,
        version=version,
    )


def _beyond_64_bits(value: Any, at: tuple[Any, ...] = ()) -> tuple[str, Any]:
    """Where the first integer outside INT_MIN..INT_MAX is (JSON path), and the integer."""
    if type(value) is int and not INT_MIN <= value <= INT_MAX:
        return json_path(at), value
    items: Any = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    for key, item in items:
        found = _beyond_64_bits(item, (*at, key))
        if found[0]:
            return found
    return "", None


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
    found = json_safe(found)
    first = {"kind": kind, "path": path, "expected": expected, "found": found, "message": message}
    version = version if type(version) is int and INT_MIN <= version <= INT_MAX else None
    return DecodeFailure(reason, {**first, "schema_version": version, "errors": [first]}, body)


def _unparseable(data: bytes, exc: Exception) -> tuple[str, str]:
    """The kind and the why of bytes that are not JSON, with what to do about the common
    causes (the parser alone says "invalid character (byte 0)" for all of them)."""
    if data[:2] == b"\x1f\x8b":
        return "json", "gzip-compressed bytes; name the file .gz (webhooks: Content-Encoding: gzip)"
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or (
        len(data) >= 4 and (data[1] == data[3] == 0 or data[0] == data[2] == 0)
    ):
        return "utf8", "UTF-16 text; convert it to UTF-8"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as bad:
        return "utf8", (
            f"not UTF-8: byte 0x{data[bad.start]:02x} at offset {bad.start} ({exc}); "
            "convert the text to UTF-8"
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        return "json", f"a NUL byte at offset {nul} ({exc}); in a string write \\u0000"
    lone = _lone_surrogate(data)
    if lone is not None:
        at, escape = lone
        return "utf8", (
            f"a lone UTF-16 surrogate escape {escape} at offset {at} (no text can hold one); "
            "write the character itself, or both halves of its surrogate pair"
        )
    return ("utf8" if "UTF-8" in str(exc) else "json"), str(exc)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(data: bytes) -> tuple[int, str] | None:
    """Offset and text of the first `\\udXXX` escape that is not half of a pair, if any: the
    parser reports one as "Input data was truncated" or a bad pair at another byte."""
    paired_low = -1
    for m in _SURROGATE_ESCAPE.finditer(data):
        at = m.start()
        slashes = 0
        while at - slashes > 0 and data[at - slashes - 1] == 0x5C:  # backslashes before it
            slashes += 1
        if slashes % 2 or at == paired_low:  # an escaped backslash, or the low half of a pair
            continue
        unit = int(m.group()[2:], 16)
        nxt = _SURROGATE_ESCAPE.match(data, m.end())
        if unit < 0xDC00 and nxt is not None and int(nxt.group()[2:], 16) >= 0xDC00:
            paired_low = m.end()
            continue
        return at, m.group().decode("ascii")
    return None


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


_NONE = itertools.repeat(None)


@dataclass(slots=True)
class _Strings:
    """The patterned top-level fields of a record decoded by the compiled path, for
    `FastSchema.strings_ok` (which reads them by name)."""

    tenant_id: str
    entity_type: str
