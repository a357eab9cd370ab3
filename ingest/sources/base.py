"""What every source implements.

A source yields `SourceBatch`es of `RawRecord`s. The worker calls `commit(batch)` for each
batch *in the order the source yielded them*, and only once every record of that batch and
of all earlier batches is durable in its sinks or in the DLQ (the commit watermark in
`ingest.pipeline.watermark` enforces the order). Only then may a source acknowledge upstream:
move a checkpoint, commit a Kafka offset, move an SFTP file to processed/, mark an inbox file
done. A crash before `commit` repeats the batch on restart; idempotency absorbs the repeat.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ingest.records import RawRecord
from ingest.timefmt import iso


@dataclass(slots=True)
class SourceBatch:
    records: list[RawRecord]
    # Opaque to the worker; the source reads it back in commit() (file + offset, offsets per
    # partition, intake ids, object key + byte offset, ...).
    position: Any = None
    # Bounds of the RawRecord.seq values in this batch (inclusive), for the commit watermark.
    # A record the source itself rejects (oversized line, undecodable bytes) still travels in
    # `records`, with `meta["reject"] = {"kind": ..., "message": ...}`, so the worker DLQs it
    # before the batch commits.
    first_seq: int = 0
    last_seq: int = 0


@dataclass(slots=True)
class AdapterHealth:
    """One entry of /health/detailed `adapters`."""

    status: str = "starting"  # starting | running | idle | paused | draining | error | stopped
    lag_seconds: float = 0.0
    last_checkpoint: dict[str, Any] | None = None
    last_checkpoint_at: float | None = None
    errors: list[str] = field(default_factory=list)  # most recent first, bounded
    records_read: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    error_count: int = 0  # every error() ever: ingest_source_errors_total follows it
    # Why `status` is `error` now, when the source knows (a condition that holds, unlike the
    # events in `errors`); health shows it as the adapter's problem. None when none.
    problem: str | None = None

    def error(self, message: str, keep: int = 10) -> None:
        self.errors.insert(0, f"{iso(time.time())} {message}")
        del self.errors[keep:]
        self.error_count += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "lag_seconds": round(self.lag_seconds, 3),
            "last_checkpoint": self.last_checkpoint,
            "last_checkpoint_at": self.last_checkpoint_at,
            "errors": list(self.errors),
            "records_read": self.records_read,
            "error_count": self.error_count,
            "problem": self.problem,
            **self.extra,
        }


class Source(Protocol):
    """Lifecycle: start, iterate batches until stopped, commit in order, close.

    The runner (`ingest.pipeline.runner`) says when to hold: `pause()` when it stops pulling
    batches for a while (drain, pause, or downstream keeping it waiting), `resume()` before it
    pulls again, `stop()` when the service stops. A source never guesses these from how long
    its iterator was left alone.
    """

    name: str  # adapter name as configured, e.g. "inbox", "kafka-main", "s3-main"
    kind: str  # inbox | webhook | kafka | s3 | sftp

    async def start(self) -> None: ...

    def batches(self) -> AsyncIterator[SourceBatch]:
        """Yield batches until `stop()`; wait (without busy looping) while there is nothing new.

        Each RawRecord carries a `seq` that increases by one per record across the source's
        life in this process; `SourceBatch.first_seq/last_seq` bound the batch.
        """
        ...

    async def commit(self, batch: SourceBatch) -> None:
        """Everything up to and including this batch is durable: acknowledge upstream."""
        ...

    async def pause(self) -> None:
        """The runner holds (the `batches()` iterator stays open): fetch nothing meanwhile,
        but stay where you are (a Kafka member keeps its place in the group)."""
        ...

    async def resume(self) -> None:
        """The runner pulls again: continue exactly where reading was held."""
        ...

    async def stop(self) -> None:
        """Shutdown: `batches()` ends after the current read; `close()` follows."""
        ...

    def health(self) -> AdapterHealth:
        """Status, lag (now minus the event time of the oldest record not yet committed,
        0 when caught up), last checkpoint and recent errors."""
        ...

    async def close(self) -> None: ...


class PullOnly:
    """`pause`/`resume` for a source that fetches only while its iterator is pulled (inbox,
    webhook, S3, SFTP): holding costs nothing, so they only say so in health (an error
    status stays shown; the status before the hold comes back on resume)."""

    _health: AdapterHealth
    _before_hold: str | None = None

    async def pause(self) -> None:
        if self._before_hold is None and self._health.status != "error":
            self._before_hold = self._health.status
            self._health.status = "paused"

    async def resume(self) -> None:
        if self._before_hold is not None:
            if self._health.status == "paused":
                self._health.status = self._before_hold
            self._before_hold = None
