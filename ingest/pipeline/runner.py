"""Drives one source: read -> admit -> decode -> deliver -> commit, in that order, forever.

Four stages: reading + decoding runs one batch ahead (a one-batch queue), so decoding the next
batch (CPU) overlaps the current batch's sink writes (I/O); the source reads the batch after
that meanwhile (read ahead: a Kafka source on its poll thread), and the decode runs on a
thread of its own, so the event loop serves the sinks' answers while the compiled decoder
works without the GIL. Nothing read ahead is acknowledged: a batch read and not delivered is
read again by the next run, as before. A batch's settling (DLQ entries,
idempotency claims, processed counts) overlaps the next batch's sink writes when the two
batches share no entity (`_consume`); and commits run behind both, in read order, one at a
time (`_commit_all`): a slow checkpoint (a Kafka offset commit took 40 ms at the median and up
to 1.4 s on a loaded machine) no longer holds up the next batch's settle and write. Batches
not yet committed never share an entity (a batch that would share one waits for those commits
first). Sink writes are sequential per source, or two at once into sinks that take concurrent
writes (`Pipeline.write_depth`), never two of one entity: records of one entity from one source
reach the sinks in source order, which is what makes revision judgements repeatable after a
crash.
Commits go through the commit watermark: a position is acknowledged only once its batch and
every batch before it are durable.

The runner tells its source when it holds (`Source.pause()` / `resume()`): at once for drain
and pause (also while a read waits in the source for data), and after HOLD_AFTER_S when
tokens or the delivery of the batch before keep the reader waiting (a Kafka member must keep
polling to stay in its group). When the service
stops, `Source.stop()` lets `batches()` end after the read in progress.

Neither stage can wait for the other forever: the consumer watches the producer's task as well
as the queue, so a reader that fails (or a consumer that fails) ends the run with its error,
for the supervisor to restart; a batch read ahead but not yet handed over is cancelled with
its reader. Records that make the code raise are isolated (`ingest.pipeline.isolate`), and
`Abandoned` (stopping during an outage) ends the run without committing the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ingest import logctx
from ingest.errors import Abandoned, is_disk_full
from ingest.pipeline.admission import Admission, BackpressureState, Rejected
from ingest.pipeline.decode import BatchFacts, DecodeFailure, Decoder
from ingest.pipeline.isolate import decode_isolating, deliver_isolating
from ingest.pipeline.progress import SourceProgress
from ingest.pipeline.watermark import CommitTracker
from ingest.pipeline.worker import Pipeline, Written
from ingest.records import RawRecord, Record, raw_dedupe_key
from ingest.sources.base import Source, SourceBatch

log = logging.getLogger(__name__)

_HOLD = (BackpressureState.DRAIN, BackpressureState.PAUSED)
HOLD_AFTER_S = 5.0  # the reader waited this long for tokens or the consumer: pause the source
STOP_GRACE_S = 5.0  # on stop, how long the read in progress may take to end by itself
# Settled batches that may wait for their commit; a settle that would leave more waits for
# the commits first (so a checkpoint store that stops answering stops the source soon).
MAX_COMMITS_BEHIND = 4
T = TypeVar("T")
_WOKEN = object()  # SourceRunner._next: the write in flight returned before the next batch


@dataclass(slots=True)
class _Decoded:
    batch: SourceBatch
    decoded: list[Record | DecodeFailure]
    claimed_before: asyncio.Task[set[bytes]]
    facts: BatchFacts | None = None


class SourceRunner:
    def __init__(
        self,
        source: Source,
        pipeline: Pipeline,
        decoder: Decoder,
        admission: Admission,
        *,
        stopping: asyncio.Event,
        on_pending: Callable[[int], None],
        progress: SourceProgress | None = None,
        pipelined: bool = True,
        take_tokens: bool = True,
    ) -> None:
        self.source = source
        self.pipeline = pipeline
        self.decoder = decoder
        self.admission = admission
        self.stopping = stopping
        self.on_pending = on_pending  # +n when records are read, -n once committed
        self.progress = progress or SourceProgress()
        # False for webhook readers: their records were charged at the door (ingest.webhook)
        self.take_tokens = take_tokens
        self._held = 0  # records this run read and has not committed (given back at its end)
        self._where = f"source {source.name}"  # for disk-full bookkeeping
        self.tracker: CommitTracker[SourceBatch] = CommitTracker()
        self.pipelined = pipelined  # settle batch N while N+1 is written (see _consume)
        # Sink writes of this source, `Pipeline.write_depth` at a time (1 unless every sink
        # takes concurrent writes); an isolation (which writes a batch again) takes every
        # slot, so it never reaches a sink beside another batch's write.
        self._writing = asyncio.Semaphore(pipeline.write_depth)
        self._source_stopped = False
        # Commits run behind the settles (`_commit_all`): batches settled and waiting for
        # their commit, in read order, and the conflict keys of every batch taken for
        # writing and not yet committed (no two of them share one: see `_consume`).
        self._to_commit: deque[SourceBatch] = deque()
        self._committer: asyncio.Task[None] | None = None
        self._uncommitted: dict[int, set[object]] = {}

    async def run(self) -> None:
        """Until `stopping` is set: then finish what was read, commit it, and return.
        An error in either stage ends the run with that error (for the supervisor)."""
        logctx.source.set(self.source.name)  # log lines of this run and its tasks name it
        self._to_commit.clear()
        self._uncommitted.clear()
        self._committer = None
        queue: asyncio.Queue[_Decoded] = asyncio.Queue(maxsize=1)
        producer = asyncio.create_task(self._produce(queue), name=f"read:{self.source.name}")
        try:
            await self._consume(queue, producer)
        except Abandoned:
            log.warning(
                "source %s: stopping during an outage; the batch is repeated later",
                self.source.name,
            )
        finally:
            if not producer.done():
                producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            while not queue.empty():  # read ahead, never delivered: not pending any more
                queue.get_nowait().claimed_before.cancel()
            if self._held:  # uncommitted reads are read again by the next run
                self.on_pending(-self._held)
                self._held = 0
            self.progress.forget_uncommitted()

    async def _gate(self) -> bool:
        """Wait while drained or paused, the source paused meanwhile; False once the service
        is stopping. The resume reaches the source at once (`Admission.until_free`; a look
        every 0.1 s cost a bench_kafka run ~50 ms from its resume on average)."""
        held = False
        try:
            while not self.stopping.is_set():
                if self.admission.state not in _HOLD:
                    return True
                if not held:
                    await self.source.pause()
                    held = True
                free = asyncio.ensure_future(self.admission.until_free())
                stop_wait = asyncio.ensure_future(self.stopping.wait())
                try:
                    await asyncio.wait({free, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    free.cancel()
                    stop_wait.cancel()
            return False
        finally:
            if held and not self.stopping.is_set():
                await self.source.resume()

    async def _stop_source(self) -> None:
        if not self._source_stopped:
            self._source_stopped = True
            await self.source.stop()

    async def _waiting(self, work: Awaitable[T]) -> T:
        """Await something the reader must wait for (tokens, room in the queue); past
        HOLD_AFTER_S the source is paused until it is done."""
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=HOLD_AFTER_S)
            if task in done:
                return task.result()
            await self.source.pause()
            try:
                return await task
            finally:
                if not self.stopping.is_set():
                    await self.source.resume()
        except BaseException:
            task.cancel()
            raise

    async def _produce(self, queue: asyncio.Queue[_Decoded]) -> None:
        batches = self.source.batches()
        next_batch: asyncio.Future[SourceBatch] | None = None
        decoding = ThreadPoolExecutor(1, thread_name_prefix=f"decode-{self.source.name}")
        # raced with each read: the service stopping, or drained or paused while the read
        # waits for data; one of each for the whole run (made again once done), not a task
        # per batch
        stop_wait = asyncio.ensure_future(self.stopping.wait())
        held: asyncio.Future[None] | None = None
        try:
            while True:
                if next_batch is None:
                    if not await self._gate():
                        break
                    next_batch = asyncio.ensure_future(anext(batches))
                if held is None or held.done():
                    held = asyncio.ensure_future(self.admission.until_held())
                racing: set[asyncio.Future[Any]] = {next_batch, stop_wait, held}
                done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
                # paused or drained while the read waits for data: the source is held now,
                # not after its next batch (an object source would otherwise list, lease and
                # GET on through an operator's pause); the read goes on after
                if (
                    held in done
                    and next_batch not in done
                    and not self.stopping.is_set()
                    and await self._gate()
                ):
                    continue
                if next_batch not in done or self.stopping.is_set():
                    # stopping: the source ends `batches()` after the read in progress; a batch
                    # read now (or read ahead) is never delivered (nor committed), so it is
                    # read again later
                    await self._stop_source()
                    await asyncio.wait({next_batch}, timeout=STOP_GRACE_S)
                    break
                try:
                    batch = next_batch.result()
                except StopAsyncIteration:
                    break
                next_batch = None
                if self.admission.state not in _HOLD:
                    # read ahead: the source reads the next batch (a Kafka source on its poll
                    # thread) while this one is admitted, decoded and queued
                    next_batch = asyncio.ensure_future(anext(batches))
                self.pipeline.disk_ok(self._where)  # reading (and its leases) works again
                self.on_pending(len(batch.records))
                self._held += len(batch.records)
                self.progress.read(len(batch.records))
                await self._waiting(self._admit(batch))
                decoded, facts = await self._decode(batch.records, decoding)
                lookup = self.pipeline.prefetch_seen(decoded, batch.records, facts)
                await self._waiting(queue.put(_Decoded(batch, decoded, lookup, facts)))
        except Exception as exc:
            if is_disk_full(exc):  # its own bookkeeping (leases) found no space: shown as such
                self.pipeline.note_disk_full(self._where, exc)
                log.error("source %s cannot read on: no disk space (%s)", self.source.name, exc)
            else:
                log.exception("source %s failed while reading", self.source.name)
            self.source.health().error(
                f"reader stopped after an unexpected error ({type(exc).__name__}: {exc})"
            )
            raise
        finally:
            stop_wait.cancel()
            if held is not None:
                held.cancel()
            if self.stopping.is_set():
                with contextlib.suppress(Exception):
                    await self._stop_source()
            if next_batch is not None:
                if not next_batch.done():
                    # cancelled while waiting: a batch it went on to read would never be
                    # delivered
                    next_batch.cancel()
                # awaited whatever it ended with (a batch read while stopping, the source's
                # end, an error): never logged as "Task exception was never retrieved"
                await asyncio.gather(next_batch, return_exceptions=True)
            aclose = getattr(batches, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            decoding.shutdown(wait=False, cancel_futures=True)

    async def _decode(
        self, raws: list[RawRecord], decoding: ThreadPoolExecutor
    ) -> tuple[list[Record | DecodeFailure], BatchFacts | None]:
        """`decode_isolating` on the reader's own thread, not the event loop: the compiled
        decoder parses, checks and hashes a batch without the GIL, so the loop meanwhile
        writes and settles the batches before (a 5,000-record batch held the loop 25-70 ms).
        With the batch's facts when the compiled path finished every record."""
        run = contextvars.copy_context().run  # the log context (source, batch) goes along
        return await asyncio.get_running_loop().run_in_executor(
            decoding, run, decode_isolating, self.decoder, raws, self.pipeline.metrics
        )

    async def _admit(self, batch: SourceBatch) -> None:
        """Take tokens for each tenant in the batch; waits while throttled or paused. A drain
        that arrives after the batch was read lets it through: it is in flight, so finish it."""
        if not self.take_tokens:
            await self.admission.wait_while_paused()
            return
        per_tenant = _per_tenant(batch.records)  # empty batch: no tokens
        for tenant, n in per_tenant.items():
            while True:
                try:
                    await self.admission.admit(tenant, n)
                    break
                except Rejected:
                    if self.stopping.is_set() or self.admission.state is BackpressureState.DRAIN:
                        return
                    await asyncio.sleep(0.1)

    async def _next(
        self,
        queue: asyncio.Queue[_Decoded],
        producer: asyncio.Task[None],
        settling: asyncio.Task[None] | None = None,
        writing: asyncio.Task[Written | None] | None = None,
    ) -> _Decoded | object | None:
        """The next batch, or None once the producer has finished and nothing is queued
        (its error, if any, is raised here, as is an error of the batch `settling`), or
        _WOKEN when the `writing` in flight returned first."""
        while True:
            if queue.empty() and producer.done():
                producer.result()
                return None
            getter = asyncio.ensure_future(queue.get())
            waiting: set[asyncio.Future[Any]] = {getter, producer}
            if settling is not None:
                waiting.add(settling)
            if writing is not None:
                waiting.add(writing)
            committer = self._committer
            if committer is not None and not committer.done():
                waiting.add(committer)
            elif committer is not None:
                committer.result()  # a commit's error ends the run now
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                return getter.result()
            getter.cancel()
            await asyncio.gather(getter, return_exceptions=True)
            if settling is not None and settling.done():
                settling.result()  # its error ends the run now, not at the next batch
                settling = None
            if committer is not None and committer.done():
                committer.result()
            if writing is not None and writing.done():
                return _WOKEN

    async def _consume(self, queue: asyncio.Queue[_Decoded], producer: asyncio.Task[None]) -> None:
        """Write batch N+1 to the sinks while batch N settles (DLQ, claims) and earlier
        batches wait for their commits; with sinks that take concurrent writes
        (`Pipeline.write_depth` 2), N+2's write starts while N+1's is still in the sink.

        Exact under kill -9 because the overlap is allowed only between batches that share
        no entity: every batch not yet committed shares none with any other, so a replay of
        each finds its entities as its first pass left them, whatever the others wrote
        (docs/architecture.md, "Pipelined batches"). A batch that shares an entity with one
        not yet committed waits until that one has been written, settled and committed (and
        every batch before it). At most one batch settles at a time, and in order; commits
        follow in read order.
        """
        depth = self.pipeline.write_depth if self.pipelined else 1
        settling: asyncio.Task[None] | None = None
        writing: tuple[_Decoded, asyncio.Task[Written | None]] | None = None
        try:
            while True:
                if writing is not None and (depth == 1 or writing[1].done()):
                    settling = await self._written(*writing, settling)
                    writing = None
                item = await self._next(
                    queue, producer, settling, writing[1] if writing is not None else None
                )
                if item is _WOKEN:
                    continue  # the write in flight returned: settle it (above)
                if item is None:
                    break
                assert isinstance(item, _Decoded)
                while (
                    self.admission.state is BackpressureState.PAUSED and not self.stopping.is_set()
                ):
                    await asyncio.sleep(0.1)
                logctx.batch.set(item.batch)  # this batch's log lines (and its settle task's)
                self.tracker.add(item.batch)
                keys = _conflict_keys(item.batch.records, item.decoded, item.facts)
                if (
                    not self.pipelined
                    or not item.batch.records
                    or any(not keys.isdisjoint(held) for held in self._uncommitted.values())
                ):
                    if writing is not None:
                        settling = await self._written(*writing, settling)
                        writing = None
                    if settling is not None:
                        await settling
                        settling = None
                    await self._commits_done()
                self._uncommitted[id(item.batch)] = keys
                if not item.batch.records:  # an empty batch still commits (e.g. end of a file)
                    item.claimed_before.cancel()
                    settling = asyncio.ensure_future(self._settle(item, None))
                    continue
                task = asyncio.ensure_future(self._write(item))
                if writing is not None:  # depth 2: N+1 is in the sink beside this one
                    try:
                        settling = await self._written(*writing, settling)
                    finally:
                        writing = (item, task)
                else:
                    writing = (item, task)
            if writing is not None:
                settling = await self._written(*writing, settling)
                writing = None
            if settling is not None:
                await settling
                settling = None
            await self._commits_done()
        finally:
            pending = [
                t
                for t in (writing[1] if writing else None, settling, self._committer)
                if t is not None and not t.done()
            ]
            for task in pending:
                task.cancel()  # like a crash: the batch is not committed, it is replayed
            await asyncio.gather(*pending, return_exceptions=True)

    async def _written(
        self,
        item: _Decoded,
        write: asyncio.Task[Written | None],
        settling: asyncio.Task[None] | None,
    ) -> asyncio.Task[None]:
        """Once `item`'s write returned and the batch before has settled: its settle task.
        A write that raised is delivered again by isolation first, one batch at a time."""
        written = await write
        if written is None:  # the write raised: isolate, one batch at a time
            if settling is not None:
                await settling
                settling = None
            async with self.admission.in_flight(), self._isolating():
                await deliver_isolating(self.pipeline, item.batch.records, item.decoded)
        if settling is not None:
            await settling
        return asyncio.ensure_future(self._settle(item, written))

    @contextlib.asynccontextmanager
    async def _isolating(self) -> AsyncIterator[None]:
        """Every write slot of this source: an isolation never writes beside another batch."""
        taken = 0
        try:
            for _ in range(self.pipeline.write_depth):
                await self._writing.acquire()
                taken += 1
            yield
        finally:
            for _ in range(taken):
                self._writing.release()

    async def _write(self, item: _Decoded) -> Written | None:
        """`Pipeline.write`, or None when it raised something unexpected (then the batch is
        delivered by `deliver_isolating`, which finds the records that make it raise)."""
        try:
            async with self.admission.in_flight(), self._writing:
                return await self.pipeline.write(
                    item.batch.records,
                    item.decoded,
                    claimed_before=item.claimed_before,
                    facts=item.facts,
                )
        except (Abandoned, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.warning("source %s: writing a batch raised %r; isolating", self.source.name, exc)
            item.claimed_before.cancel()
            return None

    async def _settle(self, item: _Decoded, written: Written | None) -> None:
        """Finish a written batch (DLQ, claims, counts), then hand what is contiguous to the
        committer; waits for the commits when more than MAX_COMMITS_BEHIND would wait."""
        if written is not None:
            try:
                await self.pipeline.settle(written)
            except (Abandoned, asyncio.CancelledError):
                raise
            except Exception as exc:
                log.warning("source %s: settling raised %r; isolating", self.source.name, exc)
                async with self._isolating():
                    await deliver_isolating(self.pipeline, item.batch.records, item.decoded)
        self._to_commit.extend(self.tracker.done(item.batch))
        committer = self._committer
        if committer is not None and committer.done():
            committer.result()  # an earlier commit failed: the run ends with its error
            committer = None
        if committer is None and self._to_commit:
            self._committer = asyncio.ensure_future(self._commit_all())
        if len(self._to_commit) > MAX_COMMITS_BEHIND:
            await self._commits_done()

    async def _commits_done(self) -> None:
        """Until every settled batch is committed (a commit's error is raised here)."""
        while self._committer is not None:
            committer = self._committer
            await committer  # not shielded: a cancelled run stops its commits (replayed)
            if self._committer is committer:
                self._committer = None

    async def _commit_all(self) -> None:
        """Commit the settled batches, in read order, one at a time, until none is left."""
        while self._to_commit:
            batch = self._to_commit[0]
            await self._commit(batch)
            self._to_commit.popleft()
            self._uncommitted.pop(id(batch), None)

    async def _commit(self, batch: SourceBatch) -> None:
        await self.pipeline.until_ok("checkpoint", lambda: self.source.commit(batch))
        log.debug("committed %d records", len(batch.records))  # JSON logs: tenant, batch
        self.on_pending(-len(batch.records))
        self._held -= len(batch.records)
        self.progress.committed(len(batch.records))


def _per_tenant(raws: Sequence[RawRecord]) -> Counter[str]:
    """Records per tenant: one set pass when the batch has one tenant (the usual case), not a
    generator step per record."""
    tenants = {raw.tenant for raw in raws}
    if len(tenants) == 1:
        return Counter({tenants.pop(): len(raws)})
    return Counter(raw.tenant for raw in raws)


def _conflict_keys(
    raws: Sequence[RawRecord],
    decoded: Sequence[Record | DecodeFailure],
    facts: BatchFacts | None = None,
) -> set[object]:
    """What two batches must not share to be settled and written at once: the entities they
    write, and the bytes of records that failed decoding (their DLQ rows and claims)."""
    if facts is not None:  # every item a Record: their entity keys, gathered by the decoder
        return facts.entities  # type: ignore[return-value]  # read only (isdisjoint)
    keys: set[object] = {r.entity_key for r in decoded if type(r) is Record}
    if len(keys) < len(decoded):
        keys.update(
            raw_dedupe_key(raw)
            for raw, r in zip(raws, decoded, strict=True)
            if type(r) is not Record
        )
    return keys
