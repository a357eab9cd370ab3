"""Poison isolation: no record can stop its source, whatever it makes the code raise.

Classified failures already have their path (a `DecodeFailure`, a `SinkResult` with a reason).
This module is for the rest, an exception nobody expected while handling a batch: in the
decoder, or anywhere in `Pipeline.deliver` (DLQ write, sinks, claims, bookkeeping). The batch
is split in halves and each half tried again, down to the single records that still raise;
each of those goes to the DLQ as VALIDATION_FAIL with `detail.kind = "unexpected_error"`, the
error's class and message and the stage, and every other record of the batch goes on as
usual. Store outages (`StoreUnavailable`, a full disk) are not poison: `Pipeline.until_ok`
waits them out, and `Abandoned` (stopping) leaves the batch uncommitted.

Repeating part of a batch is safe for the same reasons a crash is: sinks judge an equal
revision UNCHANGED, DLQ rows are upserts, idempotency claims are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ingest import logctx
from ingest.errors import Abandoned
from ingest.metrics import Metrics
from ingest.pipeline.decode import BatchFacts, DecodeFailure, Decoder
from ingest.records import RawRecord, ReasonCode, Record

if TYPE_CHECKING:
    from ingest.pipeline.worker import BatchReport, Pipeline

log = logging.getLogger(__name__)


def unexpected_failure(
    exc: BaseException, stage: str, body: dict[str, Any] | None = None
) -> DecodeFailure:
    """A record the code could not handle, as a DLQ-ready failure that says what was raised."""
    message = str(exc) or repr(exc)
    first = {
        "kind": "unexpected_error",
        "path": "$",
        "expected": None,
        "found": type(exc).__name__,
        "message": f"{stage} raised {type(exc).__name__}: {message}",
    }
    detail = {
        **first,
        "stage": stage,
        "error_class": type(exc).__name__,
        "error_message": message[:2000],
        "schema_version": None,
        "errors": [first],
    }
    return DecodeFailure(ReasonCode.VALIDATION_FAIL, detail, body)


def decode_isolating(
    decoder: Decoder, raws: Sequence[RawRecord], metrics: Metrics | None = None
) -> tuple[list[Record | DecodeFailure], BatchFacts | None]:
    """`decoder.decode_batch` (with the batch's facts), or record by record when it raises
    (no facts), so only the record that makes the decoder raise is dead-lettered."""
    try:
        return decoder.decode_batch(raws)
    except Exception as exc:
        # one line for operators (the DLQ entry has the detail); the traceback for debugging
        log.error(
            "decoder raised %s on a batch of %d records; isolating: %s",
            type(exc).__name__,
            len(raws),
            exc,
        )
        log.debug("decoder traceback", exc_info=True)
        if metrics is not None:
            metrics.isolations.labels("decode").inc()
    out: list[Record | DecodeFailure] = []
    for raw in raws:
        try:
            out.append(decoder.decode(raw))
        except Exception as exc:
            out.append(unexpected_failure(exc, "decode"))
    return out, None


async def deliver_isolating(
    pipeline: Pipeline,
    raws: Sequence[RawRecord],
    decoded: Sequence[Record | DecodeFailure],
    claimed_before: asyncio.Task[set[bytes]] | None = None,
) -> BatchReport:
    """`pipeline.deliver`, bisecting on an unexpected exception (see the module docstring)."""
    try:
        return await pipeline.deliver(raws, decoded, claimed_before=claimed_before)
    except (Abandoned, asyncio.CancelledError):
        raise
    except Exception as exc:
        if claimed_before is not None and not claimed_before.done():
            claimed_before.cancel()
        if claimed_before is not None:
            with contextlib.suppress(BaseException):
                await claimed_before
        pipeline.metrics.isolations.labels("deliver").inc()
        if len(raws) == 1:
            item = decoded[0]
            body = item.body if isinstance(item, Record | DecodeFailure) else None
            log.error(
                "record of %s/%s isolated to the DLQ: deliver raised %s: %s",
                raws[0].tenant,
                raws[0].source,
                type(exc).__name__,
                exc,
                extra=logctx.about(decoded[0] if isinstance(decoded[0], Record) else raws[0]),
            )
            # The DLQ path of a classified failure; if even that raises, it is a bug worth a
            # visible runner restart rather than a silent loss (`add_fitted` already keeps
            # the DLQ write itself from being the poison).
            return await pipeline.deliver(raws, [unexpected_failure(exc, "deliver", body)])
        log.warning(
            "deliver raised %s on a batch of %d records; isolating by bisection: %s",
            type(exc).__name__,
            len(raws),
            exc,
        )
        mid = len(raws) // 2
        first = await deliver_isolating(pipeline, raws[:mid], decoded[:mid])
        second = await deliver_isolating(pipeline, raws[mid:], decoded[mid:])
        return merge(first, second)


def merge(first: BatchReport, second: BatchReport) -> BatchReport:
    """The report of a batch delivered in two halves."""
    first.delivered += second.delivered
    first.duplicate += second.duplicate
    first.dropped += second.dropped
    first.dlq += second.dlq
    first.dlq_entries.extend(second.dlq_entries)
    for sink, (records, results) in second.sink_results.items():
        had_records, had_results = first.sink_results.get(sink, ((), []))
        first.sink_results[sink] = ([*had_records, *records], [*had_results, *results])
    return first
