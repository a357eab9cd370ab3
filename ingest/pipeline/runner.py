"""Drives one source: read -> admit -> decode -> deliver -> commit, in that order, forever.

Two stages joined by a one-batch queue, so decoding the next batch (CPU) overlaps the current
batch's sink writes (I/O). Delivery is sequential per source: records of one entity from one
source reach the sinks in source order, which is what makes revision judgements repeatable
after a crash. Commits go through the commit watermark: a position is acknowledged only once
its batch and every batch before it are durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ingest.pipeline.admission import Admission, BackpressureState, Rejected
from ingest.pipeline.decode import DecodeFailure, Decoder
from ingest.pipeline.watermark import CommitTracker
from ingest.pipeline.worker import Pipeline
from ingest.records import Record
from ingest.sources.base import Source, SourceBatch

log = logging.getLogger(__name__)

_HOLD = (BackpressureState.DRAIN, BackpressureState.PAUSED)


@dataclass(slots=True)
class _Decoded:
    batch: SourceBatch
    decoded: list[Record | DecodeFailure]
    claimed_before: asyncio.Task[set[bytes]]


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
    ) -> None:
        self.source = source
        self.pipeline = pipeline
        self.decoder = decoder
        self.admission = admission
        self.stopping = stopping
        self.on_pending = on_pending  # +n when records are read, -n once committed
        self.tracker: CommitTracker[SourceBatch] = CommitTracker()

    async def run(self) -> None:
        """Until `stopping` is set: then finish what was read, commit it, and return."""
        queue: asyncio.Queue[_Decoded | None] = asyncio.Queue(maxsize=1)
        producer = asyncio.create_task(self._produce(queue), name=f"read:{self.source.name}")
        try:
            await self._consume(queue)
        finally:
            if not producer.done():
                producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)

    async def _gate(self) -> bool:
        """Wait while drained or paused; False once the service is stopping."""
        while not self.stopping.is_set():
            if self.admission.state not in _HOLD:
                return True
            await asyncio.sleep(0.1)
        return False

    async def _produce(self, queue: asyncio.Queue[_Decoded | None]) -> None:
        batches = self.source.batches()
        try:
            while await self._gate():
                next_batch = asyncio.ensure_future(anext(batches))
                stop_wait = asyncio.ensure_future(self.stopping.wait())
                done, _ = await asyncio.wait(
                    {next_batch, stop_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                stop_wait.cancel()
                if next_batch not in done:
                    next_batch.cancel()
                    await asyncio.gather(next_batch, return_exceptions=True)
                    break
                try:
                    batch = next_batch.result()
                except StopAsyncIteration:
                    break
                self.on_pending(len(batch.records))
                await self._admit(batch)
                decoded = self.decoder.decode_many(batch.records)
                lookup = self.pipeline.prefetch_seen(decoded)
                await queue.put(_Decoded(batch, decoded, lookup))
        except Exception:
            log.exception("source %s failed while reading", self.source.name)
            self.source.health().error("reader stopped after an unexpected error; see logs")
            raise
        finally:
            await queue.put(None)
            aclose = getattr(batches, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _admit(self, batch: SourceBatch) -> None:
        """Take tokens for each tenant in the batch; waits while throttled or paused. A drain
        that arrives after the batch was read lets it through: it is in flight, so finish it."""
        per_tenant = Counter(raw.tenant for raw in batch.records)  # empty batch: no tokens
        for tenant, n in per_tenant.items():
            while True:
                try:
                    await self.admission.admit(tenant, n)
                    break
                except Rejected:
                    if self.stopping.is_set() or self.admission.state is BackpressureState.DRAIN:
                        return
                    await asyncio.sleep(0.1)

    async def _consume(self, queue: asyncio.Queue[_Decoded | None]) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            while self.admission.state is BackpressureState.PAUSED and not self.stopping.is_set():
                await asyncio.sleep(0.1)
            self.tracker.add(item.batch)
            if item.batch.records:  # an empty batch still commits (e.g. end of a file)
                async with self.admission.in_flight():
                    await self.pipeline.deliver(
                        item.batch.records, item.decoded, claimed_before=item.claimed_before
                    )
            else:
                item.claimed_before.cancel()
            for ready in self.tracker.done(item.batch):
                await self._commit(ready)

    async def _commit(self, batch: SourceBatch) -> None:
        await self.pipeline.until_ok("checkpoint", lambda: self.source.commit(batch))
        self.on_pending(-len(batch.records))
