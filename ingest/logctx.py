"""What a log line is about (tenant, source, batch, record), and the JSON log format.

The runner says what it is working on with one `ContextVar.set` per source run and per batch
(tens of nanoseconds, nothing per record on the hot path); a line about one record passes it
as `extra=about(record)`.
Everything else (a batch's id and tenant, a record's id) is worked out by the formatter, and
only for a line that is actually written. asyncio copies the context into each task it
creates, so a batch's settle task logs with that batch.

`logging.format: json` (or INGEST_LOG_FORMAT=json) writes one JSON object per line:
`ts`, `level`, `logger`, `message`, then `tenant`, `source`, `batch`, `record` where known
(`batch` is `<first seq>-<last seq>` of the source's batch, `record` `type/id@revision` or
`seq:N` before decoding),
and `exc` (the traceback) when there is one. docs/operations.md shows how to read them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

import orjson

from ingest.records import RawRecord, Record

source: ContextVar[str | None] = ContextVar("ingest_log_source", default=None)
# The batch in flight (a SourceBatch: records + seq bounds), read only when a line is written.
batch: ContextVar[Any] = ContextVar("ingest_log_batch", default=None)
tenant: ContextVar[str | None] = ContextVar("ingest_log_tenant", default=None)


def about(r: RawRecord | Record) -> dict[str, Any]:
    """`log.error(..., extra=about(r))`: the line is about this one record."""
    return {"ingest_record": r}


def batch_id(b: Any) -> str:
    """`<first seq>-<last seq>` of a batch: with the source, names it in the DLQ and metrics."""
    return f"{b.first_seq}-{b.last_seq}"


def _batch_tenant(b: Any) -> str | None:
    """The batch's tenant when all its records share one (the common case), else None."""
    records = b.records
    if not records:
        return None
    first = records[0].tenant
    return first if all(r.tenant == first for r in records) else None


def record_id(r: RawRecord | Record) -> str:
    """A decoded record's `entity_type/entity_id@revision`; a raw one's source sequence."""
    if isinstance(r, Record):
        return f"{r.entity_type}/{r.entity_id}@{r.revision}"
    return f"seq:{r.seq}"


def fields(rec: RawRecord | Record | None = None) -> dict[str, str]:
    """The context of the current task (and of `rec`), as log fields: only those known."""
    out: dict[str, str] = {}
    b = batch.get()
    who = tenant.get() or (rec.tenant if rec is not None else None)
    if who is None and b is not None:
        who = _batch_tenant(b)
    if who is not None:
        out["tenant"] = who
    raw = rec.raw if isinstance(rec, Record) else rec
    src = source.get() or (raw.source if raw is not None else None)
    if src is not None:
        out["source"] = src
    if b is not None:
        out["batch"] = batch_id(b)
    if rec is not None:
        out["record"] = record_id(rec)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the task's context fields."""

    def format(self, rec: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rec.created))
            + f".{int(rec.msecs):03d}Z",
            "level": rec.levelname,
            "logger": rec.name,
            "message": rec.getMessage(),
            **fields(getattr(rec, "ingest_record", None)),
        }
        if rec.exc_info:
            doc["exc"] = self.formatException(rec.exc_info)
        elif rec.exc_text:
            doc["exc"] = rec.exc_text
        try:
            return orjson.dumps(doc, default=str).decode()
        except TypeError:  # a lone surrogate (e.g. from a file name): escaped, still one line
            return json.dumps(doc, default=str)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr, as text lines or (`fmt="json"`) one JSON object per line carrying the
    tenant, source, batch and record the line is about."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
