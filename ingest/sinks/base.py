"""What every sink implements, and the revision rules they all share.

A sink takes a batch of validated records and returns one `SinkResult` per record, in order.
Whole-batch failures raise `SinkError` with a ReasonCode; per-record failures (a constraint
broken by one row, an older revision, a rejected document) come back as failed results. A row
the store refuses fails alone (CONSTRAINT_VIOLATION), and its entity's other records are
judged as if it had never been in the batch (`write_around_refused`): the worker then DLQs
exactly the refused rows, and a good older record of that entity still lands.
A sink never retries: the worker does (`ingest.pipeline.retry`), and a sink passes on the
server's own hint of when to come back (`SinkError(retry_after=...)`, `retry_after_seconds`).

Revision rule, identical in every sink: within a batch and against what is stored, records
of one entity are judged in arrival order. A record whose revision is higher than the highest
seen so far (stored or earlier in the batch) is APPLIED (if a later record of the same batch
supersedes it, it was still applied in order; only the last one needs writing); equal is
UNCHANGED, a harmless repeat; lower is OLDER_REVISION. Tombstones (`deleted: true`) follow the
same rule and leave a tombstone with their revision, so a late older revision cannot bring
the entity back.

Replays: a batch is written again when the worker died after the sink write and before the
idempotency claim. Judged against what the first pass stored, its superseded records would
turn into OLDER_REVISION. So every sink keeps, with each entity, the dedupe key of the record
it holds and the revision it held before (`prev_revision`); when the stored key is this
batch's winner for the entity, the batch is a replay and is judged against `prev_revision`:
the same judgement as the first pass (`replay_baseline`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from ingest.records import ReasonCode, Record, SinkResult

EntityKey = tuple[str, str, str]


class Sink(Protocol):
    """Lifecycle: start (connect, create tables / constraints / collections), write, close."""

    name: str
    kind: str

    async def start(self) -> None: ...

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        """Store a batch; one result per record in the same order. Raise SinkError for a
        failure of the whole batch (timeout, lost connection, rate limit)."""
        ...

    async def health(self) -> dict[str, Any]:
        """Connection state for /health/detailed, e.g. {"connected": true, "target": "..."}."""
        ...

    async def close(self) -> None: ...


def latest_per_entity(records: Sequence[Record]) -> list[Record]:
    """The record to write for each entity: the highest revision, first arrival among equals.

    Order of the result follows each entity's first appearance, so writes are deterministic.
    """
    best: dict[EntityKey, Record] = {}
    for rec in records:
        cur = best.get(rec.entity_key)
        if cur is None or rec.revision > cur.revision:
            best[rec.entity_key] = rec
    return list(best.values())


def judge_in_order(
    records: Sequence[Record],
    stored: Mapping[EntityKey, int | None],
    written: set[EntityKey] | None = None,
) -> list[SinkResult]:
    """Outcome of every record, given each entity's stored revision *before* the batch.

    `written`, when given, is the set of entities whose winning record the guarded write
    really applied; an entity whose winner was refused (a concurrent writer stored a higher
    revision between the read and the write) has all its records judged OLDER_REVISION.
    """
    running: dict[EntityKey, int | None] = dict(stored)
    results: list[SinkResult] = []
    for rec in records:
        key = rec.entity_key
        high = running.get(key)
        if written is not None and key not in written and (high is None or rec.revision > high):
            results.append(
                SinkResult.failed(
                    ReasonCode.OLDER_REVISION,
                    message="a concurrent writer stored a newer revision first",
                    incoming_revision=rec.revision,
                )
            )
            continue
        if high is None or rec.revision > high:
            running[key] = rec.revision
            results.append(SinkResult.applied())
        elif rec.revision == high:
            results.append(SinkResult.unchanged())
        else:
            results.append(
                SinkResult.failed(
                    ReasonCode.OLDER_REVISION,
                    message=f"revision {rec.revision} is older than stored revision {high}",
                    incoming_revision=rec.revision,
                    stored_revision=high,
                )
            )
    return results


StoredRow = tuple[int, bytes | None, int | None]  # (revision, dedupe_key, prev_revision)


def judge_batch(
    records: Sequence[Record],
    stored: Mapping[EntityKey, StoredRow],
    written: set[EntityKey] | None = None,
) -> list[SinkResult]:
    """`judge_in_order`, with replays recognised (see the module docstring).

    An entity with several records in the batch whose stored row holds exactly the batch's
    winner (same dedupe key) was written by a first pass of this batch: its records are
    judged against the revision stored before that pass, and the winner, already stored, is
    UNCHANGED. An entity with one record needs no such care: equal is UNCHANGED either way.
    """
    counts: dict[EntityKey, int] = {}
    for rec in records:
        counts[rec.entity_key] = counts.get(rec.entity_key, 0) + 1
    baseline: dict[EntityKey, int | None] = {k: row[0] for k, row in stored.items()}
    replayed: dict[EntityKey, bytes] = {}
    for rec in latest_per_entity(records):
        key = rec.entity_key
        row = stored.get(key)
        if row is not None and counts[key] > 1 and row[1] == rec.dedupe_key:
            baseline[key] = row[2]
            replayed[key] = rec.dedupe_key
    if written is not None and replayed:
        written = written | replayed.keys()
    results = judge_in_order(records, baseline, written)
    if replayed:
        for i, rec in enumerate(records):
            if replayed.get(rec.entity_key) == rec.dedupe_key:
                results[i] = SinkResult.unchanged()
                del replayed[rec.entity_key]
    return results


OnePass = Callable[
    [Sequence[Record]], Awaitable[tuple[list[SinkResult], dict[EntityKey, SinkResult]]]
]


async def write_around_refused(records: Sequence[Record], write: OnePass) -> list[SinkResult]:
    """Write `records` with `write`, one pass of a sink; a refused row fails alone.

    `write` returns one result per record and the entities whose winner (`latest_per_entity`)
    the store refused, each with that record's failure; it leaves those entities as they were.
    Their other records are written again without the refused one (its next best may win),
    until nothing is refused: the outcome is the batch's as if the refused records had not
    been in it. Costs one pass more only for a batch with a refused row.
    """
    results: dict[int, SinkResult] = {}
    todo = list(range(len(records)))
    while todo:
        batch = [records[i] for i in todo]
        judged, refused = await write(batch)
        if not refused:
            for i, result in zip(todo, judged, strict=True):
                results[i] = result
            break
        losers = {w.entity_key: w for w in latest_per_entity(batch) if w.entity_key in refused}
        again: list[int] = []
        for i, result in zip(todo, judged, strict=True):
            key = records[i].entity_key
            if key not in refused:
                results[i] = result
            elif records[i] is losers[key]:
                results[i] = refused[key]
            else:
                again.append(i)
        todo = again
    return [results[i] for i in range(len(records))]


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """An HTTP `Retry-After` header (delta-seconds or an HTTP-date) as seconds from now, for
    `SinkError(retry_after=...)`; None when absent or unreadable (then plain backoff)."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    wait = when - (time.time() if now is None else now)
    return max(0.0, wait) if math.isfinite(wait) else None
