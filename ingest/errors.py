"""Errors the pipeline understands, each carrying the ReasonCode chosen at the adapter boundary.

    IngestError                 base; never reaches an operator as a traceback
    ├── ConfigError             bad config file: names the key and what was wrong (exit 2)
    ├── StoreUnavailable        a state store (checkpoints, idempotency, DLQ) cannot be reached
    └── SinkError(reason)       a whole-batch sink failure, already classified:
                                SINK_TIMEOUT, CONNECTION_ERROR, RATE_LIMITED (retryable)
                                or CONSTRAINT_VIOLATION (not)

Drivers' exceptions are translated into SinkError once, inside each sink module, so the
worker's retry and breaker logic never imports a driver.
"""

from __future__ import annotations

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
    """A sink could not take a batch at all. `reason` decides retry and breaker handling."""

    def __init__(self, reason: ReasonCode, message: str, **detail: Any) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
        self.detail = {"message": message, **detail}
