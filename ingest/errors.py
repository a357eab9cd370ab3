"""Errors the pipeline understands, each carrying the ReasonCode chosen at the adapter boundary.

    IngestError                 base; never reaches an operator as a traceback
    ├── ConfigError             bad config file: names the key and what was wrong (exit 2)
    ├── StoreUnavailable        a state store (checkpoints, idempotency, DLQ) cannot be reached
    │   └── DiskFull            no space left where a store or sink writes: waited out, never a
    │                           DLQ reason and never a breaker failure (see `is_disk_full`)
    ├── Abandoned               the service is stopping while a batch waits for a store, a sink
    │                           or disk space: the batch stays uncommitted and is repeated
    └── SinkError(reason)       a whole-batch sink failure, already classified:
                                SINK_TIMEOUT, CONNECTION_ERROR, RATE_LIMITED (retryable)
                                or CONSTRAINT_VIOLATION (not)

Drivers' exceptions are translated into SinkError once, inside each sink module, so the
worker's retry and breaker logic never imports a driver.
"""

from __future__ import annotations

import errno
import sqlite3
from typing import Any

from ingest.records import ReasonCode


class IngestError(Exception):
    """Base class for errors the service reports in words, not tracebacks."""


class ConfigError(IngestError):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error at '{key}': {problem}")
        self.key = key
        self.problem = problem


class StoreUnavailable(IngestError):
    def __init__(self, store: str, where: str, cause: str) -> None:
        super().__init__(f"{store} store at {where} is unreachable: {cause}")
        self.store = store
        self.where = where
        self.cause = cause


class SinkError(IngestError):
    """A sink could not take a batch at all. `reason` decides retry and breaker handling.

    A sink never retries by itself (`ingest.pipeline.retry` does); it passes on what the
    server said instead: `retry_after` (seconds, e.g. a 429's Retry-After) is the earliest
    the worker tries again, and `conflict` marks a failure that says nothing about the
    sink's health (a deadlock or a race with another writer: retried, but not counted by
    the breaker)."""

    def __init__(
        self,
        reason: ReasonCode,
        message: str,
        *,
        retry_after: float | None = None,
        conflict: bool = False,
        **detail: Any,
    ) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
        self.conflict = conflict
        self.detail = {"message": message, **detail}
        if retry_after is not None:
            self.detail["retry_after_seconds"] = retry_after


class DiskFull(StoreUnavailable):
    """A write found no space left (ENOSPC, SQLite's "database or disk is full", Postgres
    53100). Records stay where they are until space comes back: a full disk is not a reason
    to give up on a valid, acknowledged record."""

    def __init__(self, where: str, cause: str) -> None:
        super().__init__("disk", where, cause)


class Abandoned(IngestError):
    """Stopping while a batch waits out an outage: leave it uncommitted, so it is repeated."""


_FULL_MESSAGES = ("database or disk is full", "no space left on device", "disk full")


def is_disk_full(exc: BaseException | None) -> bool:
    """Does this error, or one it was raised from, say the disk is full? Drivers are told
    apart by what they carry (errno, SQLite error code, SQLSTATE), so no driver is imported."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if getattr(exc, "sqlstate", None) == "53100":  # Postgres disk_full
            return True
        if any(m in str(exc).lower() for m in _FULL_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False
