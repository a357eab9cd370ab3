"""A record's whole life after its source hands it over, top to bottom.

    decode (bytes -> upgraded, validated record)       ingest.pipeline.decode
      └─ failure -> DLQ (SCHEMA_DRIFT / VALIDATION_FAIL, sink "-"), keyed by its bytes
    dedupe: same key earlier in this batch, or claimed before -> counted as duplicate
      (failures too: the same bad bytes again have no second effect)
    brownout: low priority sampled out -> dropped store (replayable), counted
    route: the sinks configured for (tenant, entity_type)
    deliver to every sink at once, each behind its breaker, with retry for retryable codes
      └─ per-sink failure -> DLQ entry for that sink only
    DLQ written (fitted: ingest.state.dlq_fit) -> idempotency keys claimed -> processed
    counts -> metrics
    (then the runner commits the source position, in order, through the commit watermark)

Nothing here acknowledges a source: `Pipeline.deliver` returns only once every record of the
batch is durable in its sinks or in the DLQ. Stores that are briefly down (Redis restarting,
Postgres failing over) are waited for, never skipped, because skipping would lose records;
so is a full disk, in a store or a sink (`ingest.errors.is_disk_full`): never a DLQ reason,
never a breaker failure. Stopping while waiting raises `Abandoned`: the batch stays
uncommitted and is repeated after the restart. An unexpected exception in here is isolated
by the runner (`ingest.pipeline.isolate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import compress
from operator import attrgetter
from typing import Any, TypeVar, cast

import msgspec

from ingest.config import Config
from ingest.errors import Abandoned, SinkError, StoreUnavailable, is_disk_full
from ingest.metrics import Metrics, observe_many
from ingest.pipeline.admission import Admission
from ingest.pipeline.breaker import BreakerState, CircuitBreaker
from ingest.pipeline.decode import BatchFacts, DecodeFailure
from ingest.pipeline.recent import ClaimLog, may_meet, union
from ingest.pipeline.retry import Retryable, RetryPolicy, retry_call
from ingest.records import (
    DLQEntry,
    LinesAt,
    RawRecord,
    ReasonCode,
    Record,
    SinkResult,
    SinkStatus,
    raw_dedupe_key,
)
from ingest.sinks.base import Sink
from ingest.state.base import DLQStore, DroppedRow, DroppedStore, IdempotencyStore
from ingest.state.dlq_fit import add_fitted
from ingest.timefmt import iso

log = logging.getLogger(__name__)
T = TypeVar("T")
# Claimed keys kept in memory (whole batches, at least this many of the latest): a lookup
# reads the claims made since it was sent, usually one batch; one older than these is sent again.
_RECENT_CLAIMS = 100_000
_FAILED = SinkStatus.FAILED  # module constants: Enum attribute access is slow in a hot loop
_UNCHANGED = SinkStatus.UNCHANGED
_APPLIED = SinkResult.applied()  # the shared instance every sink returns for "applied"
_TENANT = attrgetter("tenant")
_SOURCE = attrgetter("source")
_REVISION_MAX = 2**63 - 1  # input.schema.json: revision maximum
# Sinks whose write() may run twice at once in one process (each call on its own pooled
# connection; entities of the two batches are disjoint: SourceRunner._consume).
_CONCURRENT = frozenset({"postgres"})


@dataclass(slots=True)
class BatchReport:
    """What happened to one batch; the e2e tests and the redrive CLI read these counts."""

    delivered: int = 0
    duplicate: int = 0
    dropped: int = 0
    dlq: int = 0
    dlq_entries: list[DLQEntry] = field(default_factory=list)
    # Per sink: the records sent to it and their final results, in the same order.
    sink_results: dict[str, tuple[Sequence[Record], list[SinkResult]]] = field(default_factory=dict)

    def result_for(self, record: Record, sink: str) -> SinkResult | None:
        """The final result of `record` (the object passed to deliver) at `sink`, for redrive;
        None if it was not sent there. Linear per call: redrive pages are small."""
        sent = self.sink_results.get(sink)
        if sent is None:
            return None
        for rec, result in zip(*sent, strict=True):
            if rec is record:
                return result
        return None


@dataclass(slots=True)
class Written:
    """A batch whose sink writes are done and whose bookkeeping is not (`Pipeline.settle`)."""

    raws: Sequence[RawRecord]
    records: list[Record]  # after duplicates and brownout: what went to the sinks
    failed: list[_Failed]  # decode failures (their DLQ entries are in dlq_entries already)
    dlq_entries: list[DLQEntry]
    tally: Counter[tuple[str, str, str]]
    report: BatchReport
    by_sink: dict[str, list[Record]]
    outcomes: list[tuple[list[SinkResult], list[int]]]
    count_processed: bool
    # The decoder's facts of the batch (None: the per-record path), and `records`' dedupe
    # keys when they are the facts' (every record of the batch went on to the sinks).
    facts: BatchFacts | None = None
    keys: list[bytes] | None = None


@dataclass(slots=True)
class SinkLane:
    """A sink with its own breaker: one failing sink never holds back the others."""

    sink: Sink
    breaker: CircuitBreaker
    started: bool = False  # a sink that was down at start-up is started on first use
    _starting: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    async def ensure_started(self) -> None:
        """Start the sink once: the service's start of its sinks and a first write that comes
        before it ends (sources run beside it, `Service.start`) share one `sink.start()`; a
        start that failed or was cancelled is tried again by the next caller."""
        if self.started:
            return
        async with self._starting:
            if not self.started:
                await self.sink.start()
                self.started = True


class Pipeline:
    def __init__(
        self,
        *,
        config: Config,
        admission: Admission,
        idempotency: IdempotencyStore,
        dlq: DLQStore,
        dropped: DroppedStore,
        lanes: Mapping[str, SinkLane],
        metrics: Metrics,
        retry: RetryPolicy,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.admission = admission
        self.idempotency = idempotency
        self.dlq = dlq
        self.dropped = dropped
        self.lanes = dict(lanes)
        self.metrics = metrics
        self.retry = retry
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.store_errors: list[str] = []  # recent store outages, for /health/detailed
        self.stopping: asyncio.Event | None = None  # set: waits for outages give up
        # writes waiting for disk space, by where (a store or a sink): (since, message)
        self._full: dict[str, tuple[float, str]] = {}
        self.disk_full_error: str | None = None  # the last such message, kept for health
        # Keys claimed by the last few batches: a lookup (prefetch_seen's, or one sent while
        # another batch's claim was under way) is completed from here, so none loses a duplicate.
        self._claims = ClaimLog(_RECENT_CLAIMS)
        # Sink writes of one source that may be under way at once (SourceRunner): 2 when
        # every sink takes concurrent writes on a pool of connections, so one batch's COPY
        # and commit (an fdatasync: 4-19 ms here) overlap the next batch's; else 1.
        self.write_depth = (
            2
            if self.lanes and all(lane.sink.kind in _CONCURRENT for lane in self.lanes.values())
            else 1
        )

    def prefetch_seen(
        self,
        decoded: Sequence[Record | DecodeFailure],
        raws: Sequence[RawRecord],
        facts: BatchFacts | None = None,
    ) -> asyncio.Task[set[bytes]]:
        """Start the idempotency lookup of a batch now, while earlier batches are delivered.

        The runner decodes one batch ahead; starting its lookup at once overlaps the store's
        round trip with the sink writes of the batch before.
        """
        if facts is not None and len(facts.keys) == len(decoded):
            keys = facts.keys  # every item a Record (not changed: it is the batch's own list)
        else:
            keys = [r.dedupe_key for r in decoded if type(r) is Record]
        if len(keys) != len(decoded):  # failures are keyed by their bytes
            keys += [
                raw_dedupe_key(raws[i]) for i, r in enumerate(decoded) if type(r) is not Record
            ]
        mark = self._claims.mark()  # claims after it may be missing from the store's answer

        async def lookup() -> set[bytes]:
            found = _Seen()
            found.mark = mark
            if keys:
                flags = await self.until_ok("idempotency", lambda: self.idempotency.seen(keys))
                if len(flags) != len(keys):
                    raise ValueError(f"{len(flags)} answers for {len(keys)} keys")
                found.update(compress(keys, flags))
            return found

        return asyncio.ensure_future(lookup())

    # ------------------------------------------------------------------ the batch path
    async def deliver(
        self,
        raws: Sequence[RawRecord],
        decoded: Sequence[Record | DecodeFailure],
        *,
        check_duplicates: bool = True,
        only_sinks: Sequence[Collection[str] | None] | None = None,
        count_processed: bool = True,
        claimed_before: Awaitable[set[bytes]] | None = None,
        facts: BatchFacts | None = None,
    ) -> BatchReport:
        """Take a decoded batch to durable: sinks or DLQ. Returns the batch's counts.

        `decoded[i]` is the decoder's answer for `raws[i]`. Redrive passes
        `check_duplicates=False` (its records were claimed when they first went to the DLQ)
        and `only_sinks[i]`, the sink a DLQ entry failed at (None: every routed sink), and
        `count_processed=False` (the records were counted when first processed).
        `claimed_before` is the runner's `prefetch_seen` of this batch. `facts`: the
        decoder's `BatchFacts` of `decoded` (every item a Record), read instead of passes over
        the records; the outcome is the same without them.

        Work is per batch wherever the batch allows it: a batch of one tenant and source
        whose records all apply (the common case) costs a few C-level passes over its lists,
        not Python work per record; anything else takes the per-record path.
        """
        written = await self.write(
            raws,
            decoded,
            check_duplicates=check_duplicates,
            only_sinks=only_sinks,
            count_processed=count_processed,
            claimed_before=claimed_before,
            facts=facts,
        )
        return await self.settle(written)

    async def write(
        self,
        raws: Sequence[RawRecord],
        decoded: Sequence[Record | DecodeFailure],
        *,
        check_duplicates: bool = True,
        only_sinks: Sequence[Collection[str] | None] | None = None,
        count_processed: bool = True,
        claimed_before: Awaitable[set[bytes]] | None = None,
        facts: BatchFacts | None = None,
    ) -> Written:
        """The first half of `deliver`: decode failures, duplicates, brownout, routing, and
        the sink writes (with retry and breakers). Nothing is acknowledged or claimed yet."""
        report = BatchReport()
        tally: Counter[tuple[str, str, str]] = Counter()  # (tenant, source, outcome)
        now = self.clock()
        dlq_entries: list[DLQEntry] = []
        if (
            facts is not None
            and only_sinks is None
            and type(decoded) is list
            and len(facts.keys) == len(decoded)
        ):
            records = cast("list[Record]", decoded)  # every item a Record; no one changes it
        else:
            facts = None
            records = [item for item in decoded if type(item) is Record]
        failed: list[_Failed] = []
        if len(records) != len(decoded):
            for raw, item in zip(raws, decoded, strict=True):
                if type(item) is not Record:
                    assert isinstance(item, DecodeFailure)
                    failed.append(_Failed(raw, item, raw_dedupe_key(raw)))
        targets: dict[int, Collection[str] | None] | None = None
        if only_sinks is not None:
            targets = {id(d): only_sinks[i] for i, d in enumerate(decoded) if type(d) is Record}

        if check_duplicates:
            records, failed = await self._drop_duplicates(
                records, failed, report, tally, claimed_before, facts
            )
        for f in failed:
            dlq_entries.append(_decode_failure_entry(f.raw, f.failure, now, f.key))
            tally[(f.raw.tenant, f.raw.source, "dlq")] += 1
        records = await self._brownout(records, report, tally, now)
        # every record went on (a subsequence of the batch's as long): the facts' keys are theirs
        keys = facts.keys if facts is not None and len(records) == len(facts.keys) else None

        by_sink = self._route(records, targets, facts)
        outcomes = await asyncio.gather(
            *(
                self._deliver_to_sink(name, items, [n for n in by_sink if n != name])
                for name, items in by_sink.items()
            )
        )
        return Written(
            raws,
            records,
            failed,
            dlq_entries,
            tally,
            report,
            by_sink,
            outcomes,
            count_processed,
            facts,
            keys,
        )

    async def settle(self, written: Written) -> BatchReport:
        """The second half of `deliver`, once the sinks answered: DLQ entries, idempotency
        claims, processed counts, metrics. The runner may run it while the next batch is in
        the sinks (see SourceRunner._consume for when that is exact)."""
        raws, records, failed, dlq_entries, tally, report, by_sink = (
            written.raws,
            written.records,
            written.failed,
            written.dlq_entries,
            written.tally,
            written.report,
            written.by_sink,
        )
        commit_time = self.clock()
        facts = written.facts
        counts: Counter[tuple[str, str]] | None = None
        if facts is not None and facts.tenant is not None and facts.source is not None:
            counts = Counter({(facts.tenant, facts.source): len(raws)})  # every raw's label
        elif written.count_processed or facts is not None:
            counts = _label_counts(raws)
        if facts is None:
            label = _one_label(records)
            one_time = None
        else:  # records are some of raws: one label (event time) of raws is theirs
            label = next(iter(counts)) if counts and len(counts) == 1 and records else None
            one_time = facts.event_time
            if one_time is None:
                times = {raw.event_time for raw in raws}
                one_time = next(iter(times)) if len(times) == 1 else None
        failed_ids: set[int] = set()  # id() of records that failed at some sink
        unchanged: Counter[int] = Counter()  # id() -> sinks that found it already stored
        lags: Counter[tuple[str, str, str, float]] = Counter()  # same event time, one key
        for sink_name, (results, attempts) in zip(by_sink, written.outcomes, strict=True):
            items = by_sink[sink_name]
            report.sink_results[sink_name] = (items, results)
            if label is not None and results.count(_APPLIED) == len(results):
                if one_time is not None:
                    lags[(*label, sink_name, one_time)] += len(items)
                    continue
                for event_time, n in _counts([r.raw.event_time for r in items]).items():
                    lags[(*label, sink_name, event_time)] += n
                continue
            for rec, result, tries in zip(items, results, attempts, strict=True):
                status = result.status
                if status is _FAILED:
                    failed_ids.add(id(rec))
                    dlq_entries.append(
                        _sink_failure_entry(rec, sink_name, result, tries, commit_time)
                    )
                    continue
                if status is _UNCHANGED:
                    unchanged[id(rec)] += 1
                raw = rec.raw
                lags[(raw.tenant, raw.source, sink_name, raw.event_time)] += 1

        if dlq_entries:
            await self.until_ok("dlq", lambda: add_fitted(self.dlq, dlq_entries))
        claim = written.keys if written.keys is not None else [r.dedupe_key for r in records]
        if failed:
            claim = claim + [f.key for f in failed]
        # The claims (idempotency store) and the processed counts (DLQ store) are
        # independent of each other: both go out at once, one round trip's wait instead of
        # two. Both are done before the batch may be committed (the caller's next step).
        if not written.count_processed:
            counts = None
        steps: list[Awaitable[object]] = []
        if claim:
            steps.append(self.until_ok("idempotency", lambda: self.idempotency.claim(claim)))
        if counts:
            steps.append(self.until_ok("dlq", lambda: self.dlq.record_processed(counts)))
        await _together(*steps)
        if claim:
            self._claims.add(claim)

        if not failed_ids and not unchanged and label is not None:
            report.delivered = len(records)
            if records:
                tally[(*label, "delivered")] += len(records)
        else:
            self._outcomes(records, by_sink, failed_ids, unchanged, report, tally)
        report.dlq = len(failed) + len(failed_ids)
        report.dlq_entries = dlq_entries
        self._publish(tally, dlq_entries, lags, commit_time)
        return report

    def _route(
        self,
        records: list[Record],
        targets: Mapping[int, Collection[str] | None] | None,
        facts: BatchFacts | None = None,
    ) -> dict[str, list[Record]]:
        """Records per sink. Routes are decided once per (tenant, entity_type) in the batch;
        a batch of one such pair and no `targets` goes whole to each of its sinks (`facts`
        say so of the batch `records` are some of)."""
        if not records:
            return {}
        if targets is None:
            if facts is not None:
                tenant, entity_type = facts.tenant, facts.entity_type
            else:
                tenants = {rec.tenant for rec in records}
                types = {rec.entity_type for rec in records}
                tenant = tenants.pop() if len(tenants) == 1 else None
                entity_type = types.pop() if len(types) == 1 else None
            if tenant is not None and entity_type is not None:
                sinks = self.config.sinks_for(tenant, entity_type)
                return {name: records for name in sinks}
        pairs = {(rec.tenant, rec.entity_type) for rec in records}
        routes = {pair: self.config.sinks_for(*pair) for pair in pairs}
        by_sink: dict[str, list[Record]] = defaultdict(list)
        for rec in records:
            allowed = targets.get(id(rec)) if targets is not None else None
            for name in routes[(rec.tenant, rec.entity_type)]:
                if allowed is None or name in allowed:
                    by_sink[name].append(rec)
        return by_sink

    @staticmethod
    def _outcomes(
        records: list[Record],
        by_sink: Mapping[str, list[Record]],
        failed: set[int],
        unchanged: Counter[int],
        report: BatchReport,
        tally: Counter[tuple[str, str, str]],
    ) -> None:
        """Each record's end: dlq if any sink failed it, duplicate if every sink it went to
        already held it, else delivered (also when no sink was routed)."""
        sent: Counter[int] = Counter(id(rec) for items in by_sink.values() for rec in items)
        for rec in records:
            key = id(rec)
            if key in failed:
                outcome = "dlq"
            elif key in unchanged and unchanged[key] == sent[key]:
                outcome = "duplicate"
                report.duplicate += 1
            else:
                outcome = "delivered"
                report.delivered += 1
            tally[(rec.raw.tenant, rec.raw.source, outcome)] += 1

    def _publish(
        self,
        tally: Counter[tuple[str, str, str]],
        dlq_entries: list[DLQEntry],
        lags: Counter[tuple[str, str, str, float]],
        commit_time: float,
    ) -> None:
        """Metrics once per batch and label set: per-record label lookups cost more than work.

        `ingest_dlq_total` counts records (the first entry of each), so a record failing at
        two sinks counts once there and twice in `ingest_sink_failures_total`."""
        m = self.metrics
        for (tenant, source, outcome), n in tally.items():
            m.records.labels(tenant, source, outcome).inc(n)
        if dlq_entries:
            first_entry: dict[bytes, DLQEntry] = {}
            sink_counts: Counter[tuple[str, str, str, str]] = Counter()
            for e in dlq_entries:
                first_entry.setdefault(e.dedupe_key, e)
                if e.sink is not None:
                    sink_counts[(e.tenant, e.source, e.sink, e.reason.value)] += 1
            per_record = Counter((e.tenant, e.source, e.reason.value) for e in first_entry.values())
            for labels, n in per_record.items():
                m.dlq.labels(*labels).inc(n)
            for sink_labels, n in sink_counts.items():
                m.sink_failures.labels(*sink_labels).inc(n)
        for (tenant, source, sink, event_time), n in lags.items():
            observe_many(m.lag.labels(tenant, source, sink), max(0.0, commit_time - event_time), n)

    async def _drop_duplicates(
        self,
        records: list[Record],
        failed: list[_Failed],
        report: BatchReport,
        tally: Counter[tuple[str, str, str]],
        claimed_before: Awaitable[set[bytes]] | None,
        facts: BatchFacts | None = None,
    ) -> tuple[list[Record], list[_Failed]]:
        """A record whose key is in this batch already, or was claimed before, has no effect;
        nor do bytes that failed decoding before (keyed by tenant and bytes: `_Failed.key`).

        `claimed_before` is a lookup started while the previous batches were still being
        delivered (see `prefetch_seen`); claims made since are in `_claims`.
        """
        prefetched = None if claimed_before is None else await claimed_before
        claimed: list[Sequence[bytes]] | None = None  # the batches claimed since the lookup
        if type(prefetched) is _Seen:
            claimed = self._claims.batches(prefetched.mark)
        if claimed is None:  # no mark, or claims since it no longer held: look up again
            prefetched = None
        if failed:
            since = None if claimed is None else union(claimed)
            failed = await self._drop_repeated_failures(failed, report, tally, prefetched, since)
        first = records
        if facts is not None:  # records are the batch's, all of it (`write`)
            keys, unique = facts.keys, facts.unique
        else:
            keys = [rec.dedupe_key for rec in records]
            unique = len(set(keys)) == len(keys)
        if not unique:
            first = []
            keys_in_batch: set[bytes] = set()
            for rec in records:
                if rec.dedupe_key in keys_in_batch:
                    tally[(rec.raw.tenant, rec.raw.source, "duplicate")] += 1
                    report.duplicate += 1
                else:
                    keys_in_batch.add(rec.dedupe_key)
                    first.append(rec)
            keys = [rec.dedupe_key for rec in first]
        if not first:
            return first, failed
        recent: Set[bytes]
        if prefetched is None or claimed is None:
            seen, recent = await self._lookup(keys)
            if not seen and recent.isdisjoint(keys):
                return first, failed
        else:
            seen = prefetched
            # the usual batch: nothing claimed before, nor since the lookup (compiled check)
            if not seen and not any(may_meet(batch, keys) for batch in claimed):
                return first, failed
            recent = union(claimed)
        fresh: list[Record] = []
        for rec in first:
            key = rec.dedupe_key
            if key in seen or key in recent:
                tally[(rec.raw.tenant, rec.raw.source, "duplicate")] += 1
                report.duplicate += 1
            else:
                fresh.append(rec)
        return fresh, failed

    async def _drop_repeated_failures(
        self,
        failed: list[_Failed],
        report: BatchReport,
        tally: Counter[tuple[str, str, str]],
        prefetched: set[bytes] | None,
        recent: Set[bytes] | None,
    ) -> list[_Failed]:
        """The decode failures of a batch whose bytes did not fail before (nor earlier in it).
        `recent`: the keys claimed since `prefetched` was looked up."""
        keys = [f.key for f in failed]
        if prefetched is None or recent is None:
            seen, recent = await self._lookup(keys)
        else:
            seen = {k for k in keys if k in prefetched}
        seen.update(k for k in keys if k in recent)
        fresh: list[_Failed] = []
        for f in failed:
            if f.key in seen:
                tally[(f.raw.tenant, f.raw.source, "duplicate")] += 1
                report.duplicate += 1
            else:
                seen.add(f.key)
                fresh.append(f)
        return fresh

    async def _lookup(self, keys: Sequence[bytes]) -> tuple[set[bytes], Set[bytes]]:
        """Which of `keys` were claimed: the store's answer (claims completed before it was
        sent) and the keys claimed since (the log; another batch's claim may be under way)."""
        while True:
            mark = self._claims.mark()
            flags = await self.until_ok("idempotency", lambda: self.idempotency.seen(keys))
            recent = self._claims.since(mark)
            if recent is not None:
                return _flagged(keys, flags), recent

    async def _brownout(
        self,
        records: list[Record],
        report: BatchReport,
        tally: Counter[tuple[str, str, str]],
        now: float,
    ) -> list[Record]:
        """In brownout, low-priority records sample out by key; they are kept for replay."""
        if self.admission.brownout_rate is None:
            return records
        kept: list[Record] = []
        dropped: list[DroppedRow] = []
        for rec in records:
            if self.admission.keep_in_brownout(rec.dedupe_key, rec.priority):
                kept.append(rec)
            else:
                dropped.append((rec.dedupe_key, rec.tenant, rec.raw.source, rec.raw.data, now))
                tally[(rec.raw.tenant, rec.raw.source, "dropped")] += 1
        if dropped:
            await self.until_ok("dropped", lambda: self.dropped.add(dropped))
            report.dropped += len(dropped)
        return kept

    # ------------------------------------------------------------------ one sink
    async def _deliver_to_sink(
        self, sink_name: str, records: Sequence[Record], others: Sequence[str]
    ) -> tuple[list[SinkResult], list[int]]:
        """Final results and attempts per record: retry retryable failures, breaker first.

        An open breaker is waited out (records wait for the sink to come back) only when no
        other sink of the batch is working: otherwise its records go to the DLQ as
        CIRCUIT_OPEN at once, for redrive, so a broken sink never holds back the others.
        """
        lane = self.lanes[sink_name]
        results = await self._attempt(lane, list(records))
        attempts = [1] * len(records)
        if results.count(_APPLIED) == len(results):  # the common case: nothing to look at
            self.metrics.sink_writes.labels(sink_name, "applied").inc(len(results))
            return results, attempts
        final = list(results)
        pending = list(range(len(records)))
        attempt = 0

        async def settle() -> None:
            """Take the results of the records still pending (writing them again after the
            first time); raise `_RetryRecords` for those worth another attempt."""
            nonlocal results, pending, attempt
            if attempt:
                results = await self._attempt(lane, [records[j] for j in pending])
            attempt += 1
            retry_next: list[int] = []
            statuses: Counter[str] = Counter()
            reason: ReasonCode | None = None
            hint: float | None = None
            for j, result in zip(pending, results, strict=True):
                statuses[result.status.value] += 1
                if result.reason is not None and result.reason.retryable:
                    retry_next.append(j)
                    reason = result.reason
                    hint = _later(hint, result)
                final[j] = result
                attempts[j] = attempt
            for status, n in statuses.items():
                self.metrics.sink_writes.labels(sink_name, status).inc(n)
            if reason is not None:
                pending = retry_next
                raise _RetryRecords(Retryable(reason, hint), retry_next)

        def classify(exc: Exception) -> Retryable | None:
            if not isinstance(exc, _RetryRecords):
                return None  # Abandoned, a bug: not ours to retry
            verdict = exc.verdict
            if verdict.reason is ReasonCode.CIRCUIT_OPEN:
                if any(self.lanes[o].breaker.state is not BreakerState.OPEN for o in others):
                    return None  # another sink works: to the DLQ now, for redrive
                wait = lane.breaker.retry_after()
                return Retryable(verdict.reason, max(wait, verdict.retry_after or 0.0))
            return verdict

        def counted(exc: Exception, verdict: Retryable, attempt: int, delay: float) -> None:
            assert isinstance(exc, _RetryRecords)
            for tenant, n in Counter(records[j].tenant for j in exc.indices).items():
                self.metrics.retry.labels(tenant, sink_name, verdict.reason.value).inc(n)

        # Out of attempts or time: `final` holds each record's last failure.
        with contextlib.suppress(_RetryRecords):
            await retry_call(
                settle,
                self.retry,
                classify=classify,
                on_retry=counted,
                sleep=self.sleep,
                clock=time.monotonic,
                rng=self.rng,
            )
        return final, attempts

    async def _attempt(self, lane: SinkLane, records: list[Record]) -> list[SinkResult]:
        """One write through the breaker; whole-batch errors become one result per record."""
        if not lane.breaker.allow():
            detail = {
                "message": f"circuit breaker for sink '{lane.sink.name}' is open",
                "retry_after_seconds": round(lane.breaker.retry_after(), 3),
            }
            return [SinkResult.failed(ReasonCode.CIRCUIT_OPEN, **detail)] * len(records)
        try:
            results = await self._write_waiting_for_disk(lane, records)
        except Abandoned:
            raise
        except SinkError as exc:
            if exc.reason.retryable and not exc.conflict:
                lane.breaker.record_failure()
            else:  # the sink answered: refused data, or a conflict between writers
                lane.breaker.record_success()
            return [_sink_error_result(exc)] * len(records)
        except Exception as exc:  # a sink bug must not crash the worker: isolate, classify
            log.warning(
                "sink %s raised an unclassified %s on %d records: %s",
                lane.sink.name,
                type(exc).__name__,
                len(records),
                exc,
            )
            isolated = await self._isolate_in_sink(lane, records) if len(records) > 1 else None
            if isolated is not None:  # some records went in: the others are the poison
                lane.breaker.record_success()
                return isolated
            lane.breaker.record_failure()
            detail = {"error_class": type(exc).__name__, "message": str(exc) or repr(exc)}
            return [SinkResult.failed(ReasonCode.CONNECTION_ERROR, **detail)] * len(records)
        lane.breaker.record_success()
        if len(results) != len(records):
            raise RuntimeError(
                f"sink {lane.sink.name} returned {len(results)} results for {len(records)} records"
            )
        return results

    async def _isolate_in_sink(
        self, lane: SinkLane, records: list[Record], budget: int = 64
    ) -> list[SinkResult] | None:
        """Bisect a batch on which the sink raised something unclassified. Records that still
        make it raise on their own are VALIDATION_FAIL (`unexpected_error`, with the error);
        the rest get their real results. None when no part of the batch went in at all: then
        it is the sink, not a record (a retryable failure, through the breaker)."""
        results: list[SinkResult | None] = [None] * len(records)
        calls = 0
        wrote_some = False
        pending: list[tuple[int, int]] = [(0, len(records) // 2), (len(records) // 2, len(records))]
        while pending:
            lo, hi = pending.pop()
            part = records[lo:hi]
            if calls >= budget:
                return None
            calls += 1
            try:
                out = await self._write_waiting_for_disk(lane, part)
            except Abandoned:
                raise
            except SinkError as exc:
                results[lo:hi] = [_sink_error_result(exc)] * len(part)
                continue
            except Exception as exc:
                if hi - lo > 1:
                    mid = (lo + hi) // 2
                    pending += [(lo, mid), (mid, hi)]
                    continue
                self.metrics.isolations.labels(f"sink:{lane.sink.name}").inc()
                results[lo] = SinkResult.failed(
                    ReasonCode.VALIDATION_FAIL,
                    kind="unexpected_error",
                    stage=f"sink {lane.sink.name}",
                    error_class=type(exc).__name__,
                    message=f"sink {lane.sink.name} raised {type(exc).__name__}: {exc}",
                )
                continue
            if len(out) != len(part):
                return None
            wrote_some = True
            results[lo:hi] = out
        if not wrote_some:
            return None
        return [
            r if r is not None else SinkResult.failed(ReasonCode.CONNECTION_ERROR) for r in results
        ]

    async def _write_waiting_for_disk(
        self, lane: SinkLane, records: list[Record]
    ) -> list[SinkResult]:
        """One sink write; a full disk is waited out here (the breaker and the DLQ never see
        it: the records are valid and acknowledged, only space is missing)."""

        where = f"sink {lane.sink.name}"

        async def write() -> list[SinkResult]:
            await lane.ensure_started()
            return await lane.sink.write(records)

        def disk_full(exc: Exception) -> Retryable | None:
            return _NO_SPACE if is_disk_full(exc) else None

        results = await retry_call(
            write,
            _DISK_WAIT,
            classify=disk_full,
            on_retry=lambda exc, _, __, ___: self.note_disk_full(where, exc),
            sleep=self._pause,
            rng=self.rng,
        )
        self.disk_ok(where)
        return results

    # ------------------------------------------------------------------ stores
    async def until_ok(self, store: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Call a state store until it answers: a store outage pauses delivery, loses nothing.
        A full disk is an outage too. Raises `Abandoned` if the service stops meanwhile."""

        def outage(exc: Exception) -> Retryable | None:
            if is_disk_full(exc):
                return _NO_SPACE
            if isinstance(exc, StoreUnavailable | OSError | ConnectionError):
                return _STORE_DOWN
            return None

        def waiting(exc: Exception, verdict: Retryable, attempt: int, delay: float) -> None:
            if verdict is _NO_SPACE:
                self.note_disk_full(f"{store} store", exc)
                return
            message = f"{store} store unavailable: {exc}"
            log.warning("%s; retrying in %.1fs", message, delay)
            self.store_errors.insert(0, f"{iso(time.time())} {message}")
            del self.store_errors[10:]

        result = await retry_call(
            fn, _STORE_WAIT, classify=outage, on_retry=waiting, sleep=self._pause, rng=self.rng
        )
        self.disk_ok(f"{store} store")
        return result

    @property
    def disk_full_since(self) -> float | None:
        """Since when a write has been waiting for disk space (None: none is)."""
        return min((since for since, _ in self._full.values()), default=None)

    def note_disk_full(self, where: str, exc: BaseException) -> None:
        """A write at `where` (a store, a sink, a source's own bookkeeping) found no space;
        shown in health and `ingest_disk_full` until `disk_ok(where)`."""
        cause = _disk_full_cause(exc)
        message = f"{where}: no space left ({type(cause).__name__}: {cause})"
        if where not in self._full:
            log.error("%s; waiting for free space, retrying every few seconds", message)
        self._full[where] = (self._full.get(where, (time.time(), ""))[0], message)
        self.disk_full_error = message
        self.metrics.disk_full.set(1)

    def disk_ok(self, where: str) -> None:
        """A write at `where` went through again (cheap when nothing waits)."""
        if self._full and where in self._full:
            since, _ = self._full.pop(where)
            log.warning("%s: disk space is back after %.0fs", where, time.time() - since)
            if not self._full:
                self.metrics.disk_full.set(0)

    async def _pause(self, delay: float) -> None:
        """Sleep before retrying an outage; raise `Abandoned` once the service is stopping."""
        stopping = self.stopping
        if stopping is None:
            await self.sleep(delay)
            return
        if not stopping.is_set():
            nap = asyncio.ensure_future(self.sleep(delay))
            stop = asyncio.ensure_future(stopping.wait())
            try:
                await asyncio.wait({nap, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                nap.cancel()
                stop.cancel()
        if stopping.is_set():
            raise Abandoned("stopping while waiting for a store, a sink or disk space")


@dataclass(slots=True)
class _Failed:
    """A record that failed decoding, with the key of its bytes (repeats are duplicates)."""

    raw: RawRecord
    failure: DecodeFailure
    key: bytes


def _decode_failure_entry(
    raw: RawRecord, item: DecodeFailure, now: float, key: bytes | None = None
) -> DLQEntry:
    body = item.body or {}
    detail = dict(item.detail)
    if "csv_header" in raw.meta:
        detail["csv_header"] = raw.meta["csv_header"]
    position = raw.position
    if type(position) is LinesAt:  # one of a run of lines: this line's
        position = position.at(raw.seq)
    elif isinstance(position, msgspec.Struct):  # a source's position as a Struct: its fields
        position = msgspec.structs.asdict(position)
    if isinstance(position, dict) and "offset" not in detail:
        # where the bytes were (inbox file, S3 key, SFTP path; offset just after the line),
        # so the sender can find the line to fix
        detail["position"] = position
    at = datetime.fromtimestamp(now, UTC)
    return DLQEntry(
        dedupe_key=raw_dedupe_key(raw) if key is None else key,
        tenant=raw.tenant,
        source=raw.source,
        sink=None,
        reason=item.reason,
        detail=detail,
        payload=raw.data,
        attempts=1,
        first_failed_at=at,
        last_failed_at=at,
        entity_type=_str_or_none(body.get("entity_type")),
        entity_id=_str_or_none(body.get("entity_id")),
        revision=_revision_or_none(body.get("revision")),
    )


def _sink_failure_entry(
    rec: Record, sink: str, result: SinkResult, attempts: int, now: float
) -> DLQEntry:
    assert result.reason is not None
    detail: dict[str, Any] = dict(result.detail or {})
    if "csv_header" in rec.raw.meta:
        detail["csv_header"] = rec.raw.meta["csv_header"]
    at = datetime.fromtimestamp(now, UTC)
    return DLQEntry(
        dedupe_key=rec.dedupe_key,
        tenant=rec.tenant,
        source=rec.raw.source,
        sink=sink,
        reason=result.reason,
        detail=detail,
        payload=rec.raw.data,
        attempts=attempts,
        first_failed_at=at,
        last_failed_at=at,
        entity_type=rec.entity_type,
        entity_id=rec.entity_id,
        revision=rec.revision,
    )


def _one_label(records: Sequence[Record]) -> tuple[str, str] | None:
    """(tenant, source) when every record shares them (a batch from one source usually does),
    else None: then metrics are labelled record by record."""
    if not records:
        return None
    tenants = {rec.raw.tenant for rec in records}  # comprehensions: faster than attrgetter
    sources = {rec.raw.source for rec in records}  # on Structs
    if len(tenants) == 1 and len(sources) == 1:
        return (tenants.pop(), sources.pop())
    return None


async def _together(*steps: Awaitable[object]) -> None:
    """Await `steps` concurrently; if one raises, the others are cancelled (and awaited)
    before its error propagates, so none is left running behind the caller's back."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _label_counts(raws: Sequence[RawRecord]) -> Counter[tuple[str, str]]:
    """Records per (tenant, source): one set pass per field when the batch has one label
    (the usual case), instead of a tuple and a count per record."""
    tenants = {raw.tenant for raw in raws}
    sources = {raw.source for raw in raws}
    if len(tenants) == 1 and len(sources) == 1:
        return Counter({(tenants.pop(), sources.pop()): len(raws)})
    return Counter(zip(map(_TENANT, raws), map(_SOURCE, raws), strict=True))


def _counts(values: list[T]) -> Mapping[T, int]:
    """`Counter(values)`, in one C-level pass when they are all equal (a batch read from one
    file shares its event time)."""
    if values and values.count(values[0]) == len(values):
        return {values[0]: len(values)}
    return Counter(values)


class _Seen(set[bytes]):
    """A prefetched lookup's answer, with the claim log's mark taken before it was sent."""

    __slots__ = ("mark",)
    mark: int


def _flagged(keys: Sequence[bytes], flags: Sequence[bool]) -> set[bytes]:
    """The keys whose flag is set (an idempotency lookup's answer), one per key."""
    if len(flags) != len(keys):
        raise ValueError(f"{len(flags)} answers for {len(keys)} keys")
    return set(compress(keys, flags))


def _revision_or_none(value: Any) -> int | None:
    """A revision the DLQ's 64-bit column holds (the schema's range), else None: the record's
    bytes and `detail.found` still say what was sent."""
    return value if type(value) is int and 0 <= value <= _REVISION_MAX else None


def _disk_full_cause(exc: BaseException) -> BaseException:
    """The innermost error of the chain that says the disk is full (what to show)."""
    found = exc
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if is_disk_full(cur) and not is_disk_full(cur.__cause__ or cur.__context__):
            return cur
        found = cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return found


def _sink_error_result(exc: SinkError) -> SinkResult:
    detail = {"error_class": type(exc.__cause__ or exc).__name__, **exc.detail}
    return SinkResult.failed(exc.reason, **detail)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# Outages are waited out without bounds; a sink's failures are bounded by `retry` instead.
_STORE_WAIT = RetryPolicy.patient(base_delay=0.1, max_delay=5.0)
_DISK_WAIT = RetryPolicy.patient(base_delay=0.2, max_delay=5.0)
_STORE_DOWN = Retryable(ReasonCode.CONNECTION_ERROR)
_NO_SPACE = Retryable(ReasonCode.CONNECTION_ERROR)


class _RetryRecords(Exception):
    """Some records of a sink write failed with a retryable reason: write those again."""

    def __init__(self, verdict: Retryable, indices: list[int]) -> None:
        super().__init__(verdict.reason.value)
        self.verdict = verdict
        self.indices = indices


def _later(hint: float | None, result: SinkResult) -> float | None:
    """The longest wait a failed result asked for (`retry_after_seconds` in its detail:
    a server's Retry-After, passed on by the sink)."""
    asked = (result.detail or {}).get("retry_after_seconds")
    if not isinstance(asked, int | float) or isinstance(asked, bool) or not asked > 0:
        return hint
    return float(asked) if hint is None or asked > hint else hint
