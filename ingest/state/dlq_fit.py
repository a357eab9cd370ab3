"""A DLQ write must never be the poison: entries are made to fit every backend, then written.

A record is dead-lettered *because* something about it is odd, so the odd value is exactly
what reaches the DLQ row: a revision past 64 bits (SQLite's INTEGER and Postgres' bigint
refuse it), a NUL character (Postgres text and jsonb refuse it), a value nested deeper than the
JSON encoder goes, integers JSON cannot carry exactly. `fit` keeps what fits as it is, turns
the rest into text (the original is kept in `detail`, and the payload bytes are never
touched), and `add_fitted` writes a batch so that one entry a store still refuses is isolated
(bisection) and written in a minimal form instead of stranding the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ingest.errors import StoreUnavailable, is_disk_full
from ingest.records import DLQEntry
from ingest.state.base import DLQStore

log = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 32  # deeper values in `detail` are kept as (truncated) text
MAX_TEXT = 4096  # characters of one string in `detail`
MAX_ITEMS = 200  # members of one list or object in `detail`


def fit(entry: DLQEntry) -> DLQEntry:
    """The entry with every field storable on SQLite and Postgres alike."""
    detail = _fit_value(entry.detail, 0)
    if not isinstance(detail, dict):
        detail = {"detail": detail}
    revision = entry.revision
    if revision is not None and (
        type(revision) is not int or not INT64_MIN <= revision <= INT64_MAX
    ):
        detail.setdefault("revision", _text(str(revision)))
        revision = None
    return replace(
        entry,
        tenant=_column(entry.tenant),
        source=_column(entry.source),
        sink=None if entry.sink is None else _column(entry.sink),
        detail=detail,
        entity_type=None if entry.entity_type is None else _column(entry.entity_type),
        entity_id=None if entry.entity_id is None else _column(entry.entity_id),
        revision=revision,
    )


def minimal(entry: DLQEntry, error: BaseException) -> DLQEntry:
    """What is left when a store refuses even the fitted entry: reason, payload, the error."""
    return replace(
        entry,
        tenant=_ascii(entry.tenant),
        source=_ascii(entry.source),
        sink=None if entry.sink is None else _ascii(entry.sink),
        detail={
            "message": _ascii(str(entry.detail.get("message", "")))[:MAX_TEXT],
            "dlq_write_error": f"{type(error).__name__}: {_ascii(str(error))[:MAX_TEXT]}",
        },
        entity_type=None,
        entity_id=None,
        revision=None,
    )


async def add_fitted(store: DLQStore, entries: Sequence[DLQEntry]) -> None:
    """`store.add` of the fitted entries. A store outage (StoreUnavailable, a full disk) is
    raised for the caller to wait out; any other refusal is narrowed down by bisection to the
    entries that cause it, which are written minimal."""
    if entries:
        await _add(store, [fit(e) for e in entries])


async def _add(store: DLQStore, entries: list[DLQEntry]) -> None:
    try:
        await store.add(entries)
        return
    except StoreUnavailable:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise
        if len(entries) > 1:
            mid = len(entries) // 2
            await _add(store, entries[:mid])
            await _add(store, entries[mid:])
            return
        log.error(
            "DLQ store refused an entry (%s: %s); writing it in minimal form",
            type(exc).__name__,
            exc,
        )
        await store.add([minimal(entries[0], exc)])


def _fit_value(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else str(value)
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, bytes | bytearray):
        return _text(bytes(value).decode("utf-8", "replace"))
    if depth >= MAX_DEPTH:
        return _text(repr(value))
    if isinstance(value, dict):
        items = list(value.items())[:MAX_ITEMS]
        return {_text(str(k)): _fit_value(v, depth + 1) for k, v in items}
    if isinstance(value, list | tuple | set | frozenset):
        return [_fit_value(v, depth + 1) for v in list(value)[:MAX_ITEMS]]
    return _text(str(value))


def _text(value: str) -> str:
    """No NUL (Postgres refuses it) and no lone surrogate (not encodable as UTF-8)."""
    if len(value) > MAX_TEXT:
        value = value[:MAX_TEXT] + f"... ({len(value)} characters)"
    if "\x00" in value:
        value = value.replace("\x00", "\\u0000")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _column(value: str) -> str:
    return _text(str(value))


def _ascii(value: str) -> str:
    return str(value).encode("ascii", "backslashreplace").decode("ascii").replace("\x00", "")
