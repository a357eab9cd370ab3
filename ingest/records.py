"""The record as it travels through the pipeline, the eight DLQ reason codes, and the dedupe key.

Every other module speaks in these types, so a reader can follow one record from a source
(`RawRecord`) through decoding (`Record`) to a sink outcome (`SinkResult`) or the DLQ
(`DLQEntry`) without knowing which backend is behind each step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Any, cast

import msgspec
import orjson


class ReasonCode(StrEnum):
    """Why a record is in the DLQ. The set and the retryable flags are the runbook's appendix."""

    SCHEMA_DRIFT = "SCHEMA_DRIFT"
    VALIDATION_FAIL = "VALIDATION_FAIL"
    OLDER_REVISION = "OLDER_REVISION"
    SINK_TIMEOUT = "SINK_TIMEOUT"
    CONSTRAINT_VIOLATION = "CONSTRAINT_VIOLATION"
    CONNECTION_ERROR = "CONNECTION_ERROR"
    RATE_LIMITED = "RATE_LIMITED"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_RETRYABLE = frozenset(
    {
        ReasonCode.SINK_TIMEOUT,
        ReasonCode.CONNECTION_ERROR,
        ReasonCode.RATE_LIMITED,
        ReasonCode.CIRCUIT_OPEN,
    }
)

_DESCRIPTIONS = {
    ReasonCode.SCHEMA_DRIFT: "Input doesn't match expected schema",
    ReasonCode.VALIDATION_FAIL: "Data validation failed",
    ReasonCode.OLDER_REVISION: "Record has older revision than existing",
    ReasonCode.SINK_TIMEOUT: "Sink operation timed out",
    ReasonCode.CONSTRAINT_VIOLATION: "Database constraint violation",
    ReasonCode.CONNECTION_ERROR: "Network/connection failure",
    ReasonCode.RATE_LIMITED: "Rate limit exceeded",
    ReasonCode.CIRCUIT_OPEN: "Circuit breaker is open",
}


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class RawRecord(msgspec.Struct, gc=False):
    """Bytes as a source delivered them, before any decoding.

    `position` is opaque to the pipeline: the source uses it to checkpoint. `seq` is the
    source-local sequence number the commit watermark tracks. `event_time` is the source's
    own time for the record (Kafka timestamp, object LastModified, file mtime, webhook
    receipt), which `ingest_lag_seconds` measures from. `decoded` is set by sources whose
    format is not JSON lines (CSV), so the decoder does not parse twice.

    A msgspec Struct rather than a dataclass: one is built per record read, and a Struct is
    built in C at about the cost of a tuple; untracked by the garbage collector (`gc=False`:
    it never takes part in a cycle), so a batch in flight costs the collector nothing.
    """

    data: bytes
    tenant: str
    source: str
    seq: int
    position: Any
    event_time: float
    decoded: dict[str, Any] | None = None
    meta: dict[str, Any] = msgspec.field(default_factory=dict)


class LinesAt(msgspec.Struct, frozen=True, gc=False):
    """Where a run of lines read together was, the `position` every RawRecord of the run
    shares (the inbox's): the file and the offset just after each line, by the record's
    `seq` (`first` is the first line's). One object a run where a position a line cost its
    building and freeing on the event loop; `at(seq)` is what a DLQ entry says,
    `{"file", "offset"}`."""

    file: str
    first: int
    ends: list[int]

    def at(self, seq: int) -> dict[str, Any]:
        return {"file": self.file, "offset": self.ends[seq - self.first]}


# The `meta` of RawRecords whose source sets none, one object for all of them (the inbox's
# lines): an empty dict a record cost its building and its freeing on the event loop. Read
# only, so a write to it raises rather than reaching every record that shares it; a source
# that sets meta builds the record with a dict of its own (the default).
NO_META: dict[str, Any] = cast("dict[str, Any]", MappingProxyType({}))


class Record(msgspec.Struct, gc=False):
    """A decoded record, upgraded to the current schema version and validated.

    The key fields are read out of the body once, by the decoder: sinks and the worker ask for
    them many times per record (routing, in-batch ordering, revision judging). Build one from a
    body with `Record.of`; the decoder's fast path fills the fields itself. A Struct (built in
    C) that the garbage collector does not track (`gc=False`: it is never part of a cycle), so
    a batch of records costs the collector nothing.

    The compiled decoder leaves the body out (`_body` None): the SQLite and Postgres sinks take
    their rows, built with the record, and nothing else on their path reads it; building it and
    freeing it cost ~1 µs a record. `body` builds it from the bytes on first read (`body_of`).
    """

    raw: RawRecord
    _body: dict[str, Any] | None  # None: not built yet (see `body`)
    dedupe_key: bytes  # 32-byte SHA-256 digest
    tenant: str
    entity_type: str
    entity_id: str
    revision: int
    entity_key: tuple[str, str, str]
    deleted: bool
    priority: str  # "high" | "normal" | "low"
    # The Postgres sink's row in binary COPY format (its 9 fields, without the field count),
    # written by the compiled decoder from the bytes it hashed; None from the Python paths
    # (the sink then encodes the row itself). Derived from `body`: whoever changes `body`
    # after decoding must drop it (`msgspec.structs.replace(rec, copy_row=None,
    # sqlite_row=None)`).
    copy_row: bytes | None = None
    # The SQLite sink's row but its updated_at (`SQLiteSink.row_of`), built by the compiled
    # decoder when an SQLite sink is configured; None otherwise. Derived from `body` as above.
    sqlite_row: tuple[Any, ...] | None = None

    @property
    def body(self) -> dict[str, Any]:
        """The validated, current-version body; built from `raw.data` on first read when the
        compiled decoder left it out, then kept (a change to it stays, as to any body)."""
        body = self._body
        if body is None:
            body = self._body = body_of(self.raw.data)
        return body

    @classmethod
    def of(cls, raw: RawRecord, body: dict[str, Any], dedupe_key: bytes) -> Record:
        """The record of a validated, current-version body."""
        tenant = str(body["tenant_id"])
        entity_type = str(body["entity_type"])
        entity_id = str(body["entity_id"])
        return cls(
            raw,
            body,
            dedupe_key,
            tenant,
            entity_type,
            entity_id,
            int(body["revision"]),
            (tenant, entity_type, entity_id),
            bool(body.get("deleted", False)),
            str(body.get("priority", "normal")),
        )


_json_loads = msgspec.json.Decoder().decode  # exact integers, as the decoder reads them


def body_of(data: bytes) -> dict[str, Any]:
    """The body the compiled decoder builds of `data`, a line it accepted (schema_version 3,
    every field of the right type, no key twice): top-level keys sorted, defaults filled in,
    each relation's keys in the order `type`, `target_type`, `target_id`; attributes as sent.
    Equal to the eager body in values, types and order (tests/unit/test_decode_native.py)."""
    sent = _json_loads(data)
    relations = sent.get("relations")
    return {
        "attributes": sent["attributes"],
        "deleted": sent.get("deleted", False),
        "entity_id": sent["entity_id"],
        "entity_type": sent["entity_type"],
        "occurred_at": sent["occurred_at"],
        "priority": sent.get("priority", "normal"),
        "relations": [
            {"type": r["type"], "target_type": r["target_type"], "target_id": r["target_id"]}
            for r in relations
        ]
        if relations
        else [],
        "revision": sent["revision"],
        "schema_version": sent["schema_version"],
        "tenant_id": sent["tenant_id"],
    }


def dedupe_key(body: dict[str, Any]) -> bytes:
    """SHA-256 over the canonical encoding of what makes a record the same record.

    The body is the record *after* upgrading to the current schema version, so the same
    change sent as v1 and as v3 has one key. Keys sorted, no whitespace: orjson's
    OPT_SORT_KEYS gives a stable byte string.
    """
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()


def raw_dedupe_key(raw: RawRecord) -> bytes:
    """Key for bytes that never decoded: the same bad line twice is one DLQ entry."""
    h = hashlib.sha256(raw.tenant.encode())
    h.update(b"\0")
    h.update(raw.data)
    return h.digest()


class SinkStatus(Enum):
    """What a sink did with one record."""

    APPLIED = "applied"  # written: new row, newer revision, or tombstone applied
    UNCHANGED = "unchanged"  # equal revision already stored: a harmless repeat
    FAILED = "failed"  # see SinkResult.reason / detail


@dataclass(slots=True, frozen=True)
class SinkResult:
    status: SinkStatus
    reason: ReasonCode | None = None
    detail: dict[str, Any] | None = None

    @staticmethod
    def applied() -> SinkResult:
        return _APPLIED

    @staticmethod
    def unchanged() -> SinkResult:
        return _UNCHANGED

    @staticmethod
    def failed(reason: ReasonCode, **detail: Any) -> SinkResult:
        return SinkResult(SinkStatus.FAILED, reason, detail)


_APPLIED = SinkResult(SinkStatus.APPLIED)
_UNCHANGED = SinkResult(SinkStatus.UNCHANGED)


@dataclass(slots=True)
class DLQEntry:
    """One record that could not be delivered to one sink (or to any: `sink is None`).

    `sink is None` means the record failed before routing (drift, validation, decode): a
    redrive sends it to every sink its route names. `detail` is JSON: for schema errors it
    holds `path` (JSON path), `expected`, `kind` (the failed keyword) and `message`; for sink
    errors `error_class` and `message`.
    """

    dedupe_key: bytes
    tenant: str
    source: str
    sink: str | None
    reason: ReasonCode
    detail: dict[str, Any]
    payload: bytes
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    entity_type: str | None = None
    entity_id: str | None = None
    revision: int | None = None
    id: int | None = None  # assigned by the store
