"""Protocols for the service's state: checkpoints, idempotency keys and the DLQ.

Embedded mode implements all three on one SQLite file (`ingest.state.sqlite`); production
mode puts checkpoints and idempotency keys on Redis and the DLQ on Postgres.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson

from ingest.names import representable, shown
from ingest.records import DLQEntry, ReasonCode


def checkpoint_key(tenant: str, source: str) -> str:
    return f"checkpoint:{tenant}:{source}"


def checkpoint_value(
    tenant: str, source: str, position: Mapping[str, Any], updated_at: str, worker: str
) -> bytes:
    """The JSON value every checkpoint store writes. A string that is not Unicode text (a
    file name with undecodable bytes) cannot be stored: ValueError naming it, not a driver's
    encoding error deep in a retry loop. Sources quarantine such names before they get here."""
    doc = {"position": dict(position), "updated_at": updated_at, "worker": worker}
    try:
        checkpoint_key(tenant, source).encode("utf-8")
        return orjson.dumps(doc, default=str)
    except (UnicodeEncodeError, orjson.JSONEncodeError):
        bad = [
            f"{k} '{shown(v)}'"
            for k, v in (("tenant", tenant), ("source", source), *position.items())
            if isinstance(v, str) and not representable(v)
        ]
        raise ValueError(
            f"checkpoint {shown(checkpoint_key(tenant, source))} cannot be stored: text that "
            f"is not UTF-8 in {', '.join(bad) or 'the position'}"
        ) from None


class CheckpointStore(Protocol):
    """Key `checkpoint:<tenant>:<source>`; value JSON {"position", "updated_at", "worker"}."""

    async def load(self, tenant: str, source: str) -> dict[str, Any] | None:
        """The stored position (the `position` member), or None to start from the beginning."""
        ...

    async def save(self, tenant: str, source: str, position: Mapping[str, Any]) -> None: ...

    async def delete(self, tenant: str, source: str) -> None: ...


class IdempotencyStore(Protocol):
    """Dedupe keys (32-byte SHA-256 digests) with a TTL (7 days by default)."""

    async def seen(self, keys: Sequence[bytes]) -> list[bool]:
        """One round trip for the whole batch: True where the key was already claimed."""
        ...

    async def claim(self, keys: Sequence[bytes]) -> None:
        """Mark keys done. Called only once their records are durable in sinks or the DLQ."""
        ...

    async def stats(self) -> dict[str, Any]:
        """{"keys": int, "memory_bytes": int | None, "oldest_bucket": str | None, ...}."""
        ...


@dataclass(slots=True)
class DLQFilter:
    tenant: str | None = None
    reasons: Sequence[ReasonCode] = ()
    sources: Sequence[str] = ()
    sinks: Sequence[str] = ()  # "-" selects entries with no sink (pre-sink failures)
    since: datetime | None = None  # last_failed_at >= since
    until: datetime | None = None  # last_failed_at < until
    older_than: datetime | None = None  # first_failed_at < older_than (purge)
    ids: Sequence[int] = ()


@dataclass(slots=True)
class DLQGroup:
    reason: ReasonCode
    sink: str | None
    source: str
    count: int
    oldest: datetime
    newest: datetime
    extra: dict[str, Any] = field(default_factory=dict)


class DLQStore(Protocol):
    """Failed records with reason, detail and original bytes; one row per (dedupe_key, sink).

    `add` is idempotent: the same record failing again at the same sink updates its row
    (attempts += the new attempts, last_failed_at, reason, detail) instead of adding one, so a
    crash that repeats work never doubles DLQ entries.
    """

    async def add(self, entries: Sequence[DLQEntry]) -> None: ...

    async def record_processed(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Add to the per-(tenant, source) count of records processed (for the DLQ rate)."""
        ...

    async def processed_total(self, tenant: str | None) -> int: ...

    async def count(self, flt: DLQFilter) -> int: ...

    async def count_records(self, flt: DLQFilter) -> int:
        """Distinct records (dedupe keys) among the matching entries: a record that failed
        at two sinks has two entries and counts once here (the DLQ rate's numerator)."""
        ...

    async def groups(self, flt: DLQFilter) -> list[DLQGroup]:
        """Counts by (reason, sink, source) with oldest/newest last_failed_at."""
        ...

    def scan(self, flt: DLQFilter, batch_size: int = 500) -> AsyncIterator[list[DLQEntry]]:
        """Matching entries in id order, in pages; safe to interleave with delete/fail_again."""
        ...

    async def delete(self, ids: Sequence[int]) -> int: ...

    async def fail_again(
        self, entry_id: int, reason: ReasonCode, detail: Mapping[str, Any], attempts: int
    ) -> None:
        """A redriven entry failed again: add attempts, set reason/detail/last_failed_at."""
        ...

    async def health(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


# A record brownout dropped: (dedupe key, tenant, source, payload, dropped_at epoch seconds).
DroppedRow = tuple[bytes, str, str, bytes, float]


class DroppedStore(Protocol):
    """Records brownout dropped, kept so a later replay can bring them back."""

    async def add(self, records: Sequence[DroppedRow]) -> None: ...

    async def count(self, tenant: str | None = None) -> int: ...

    def scan(
        self, tenant: str | None = None, batch_size: int = 500
    ) -> AsyncIterator[list[DroppedRow]]: ...

    async def delete(self, keys: Sequence[bytes]) -> int: ...
