"""Redrive: DLQ entries back through the real decoder and pipeline, page by page.

Why it is safe to interrupt and repeat: an entry is deleted only after its page was delivered,
and sinks judge an equal revision UNCHANGED, so a page repeated after a kill is a no-op that
then deletes what it should. Pages are keyset-ordered and bounded to entries that failed
before the run started, so rows the run itself writes are never picked up again.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from ingest.factory import Core
from ingest.formats import LineReader
from ingest.pipeline.decode import DecodeFailure
from ingest.pipeline.worker import BatchReport
from ingest.records import DLQEntry, RawRecord, ReasonCode, Record, SinkStatus, raw_dedupe_key
from ingest.state.base import DLQFilter

PAGE_SIZE = 200


@dataclass(slots=True)
class RedriveResult:
    selected: int = 0  # entries looked at
    delivered: int = 0  # left the DLQ: APPLIED or UNCHANGED at every target sink
    failed: int = 0  # still in the DLQ (same row, attempts bumped, or a new row for a new sink)
    interrupted: bool = False
    new_reasons: Counter[str] = field(default_factory=Counter)
    failed_ids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "delivered": self.delivered,
            "failed": self.failed,
            "interrupted": self.interrupted,
            "failed_again_by_reason": dict(self.new_reasons),
            "failed_ids": self.failed_ids[:100],
        }


def to_raw(entry: DLQEntry, seq: int) -> RawRecord:
    """The entry's bytes as its source first delivered them (CSV rows rebuilt with their
    header, so the decoder coerces cells exactly as the source did)."""
    header = entry.detail.get("csv_header")
    decoded = _csv_row(header, entry.payload) if isinstance(header, list) else None
    meta: dict[str, Any] = {"redrive": entry.id}
    if isinstance(header, list):
        meta["csv_header"] = header
    return RawRecord(
        entry.payload,
        entry.tenant,
        entry.source,
        seq,
        None,
        entry.first_failed_at.timestamp(),
        decoded,
        meta,
    )


def _csv_row(header: list[Any], payload: bytes) -> dict[str, Any] | None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([str(h) for h in header])
    reader = LineReader("csv", False)
    lines = reader.feed(buf.getvalue().encode() + payload + b"\n") + reader.finish()
    return lines[0].decoded if lines else None


async def redrive(
    core: Core,
    flt: DLQFilter,
    *,
    page_size: int = PAGE_SIZE,
    on_page: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> RedriveResult:
    """Deliver matching entries to the sink each failed at (every routed sink when None)."""
    now = datetime.now(UTC)
    flt = replace(flt, until=min(flt.until, now) if flt.until is not None else now)
    result = RedriveResult()
    seq = 0
    async for page in core.stores.dlq.scan(flt, page_size):
        raws = []
        for e in page:
            seq += 1
            raws.append(to_raw(e, seq))
        decoded = core.decoder.decode_many(raws)
        only = [{e.sink} if e.sink is not None else None for e in page]
        report = await core.pipeline.deliver(
            raws, decoded, check_duplicates=False, only_sinks=only, count_processed=False
        )
        done, stale = _settle(core, page, raws, decoded, report, result)
        await core.stores.dlq.delete(done + stale)
        result.selected += len(page)
        if on_page is not None:
            on_page(len(page))
        if should_stop():
            result.interrupted = True
            break
    return result


def _settle(
    core: Core,
    page: Sequence[DLQEntry],
    raws: Sequence[RawRecord],
    decoded: Sequence[Record | DecodeFailure],
    report: BatchReport,
    result: RedriveResult,
) -> tuple[list[int], list[int]]:
    """(ids delivered, ids superseded by a new row for the same record). An entry that failed
    again on its own (dedupe_key, sink) row was already updated in place by deliver()."""
    done: list[int] = []
    stale: list[int] = []
    for i, (entry, item) in enumerate(zip(page, decoded, strict=True)):
        assert entry.id is not None
        rows: set[tuple[bytes, str | None]]
        if isinstance(item, DecodeFailure):
            rows = {(raw_dedupe_key(raws[i]), None)}
            reasons = [item.reason]
        else:
            targets = [
                s
                for s in core.config.sinks_for(item.tenant, item.entity_type)
                if entry.sink is None or s == entry.sink
            ]
            if not targets:  # its sink is no longer configured or routed: leave it alone
                result.failed += 1
                result.failed_ids.append(entry.id)
                result.new_reasons["NOT_ROUTED"] += 1
                continue
            outcomes = {s: report.result_for(item, s) for s in targets}
            bad = {s: r for s, r in outcomes.items() if r is None or r.status is SinkStatus.FAILED}
            if not bad:
                done.append(entry.id)
                result.delivered += 1
                continue
            rows = {(item.dedupe_key, s) for s in bad}
            reasons = [(r and r.reason) or ReasonCode.CONNECTION_ERROR for r in bad.values()]
        result.failed += 1
        result.failed_ids.append(entry.id)
        result.new_reasons.update(r.value for r in reasons)
        if (entry.dedupe_key, entry.sink) not in rows:
            stale.append(entry.id)  # its failure now lives on another row: keep exactly one
    return done, stale
