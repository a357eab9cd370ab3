"""Webhook records, read back from the embedded (SQLite) intake the door appended them to.

`POST /v1/webhooks/{tenant}/{source}` answers 202 only after the body is durable in the intake
(SQLite here; a Kafka topic in production, read by the Kafka source instead of this one). This
source then feeds intake rows through the same pipeline as every other source. One row (a
request's lines for this worker's partitions: ingest.webhook.spread) is never split across
batches. A row is
deleted from the intake once committed; `checkpoint:<tenant>:<source>` records the last
intake id committed for each tenant and webhook source, for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ingest.config import WebhookSourceConfig
from ingest.records import RawRecord
from ingest.sources.base import AdapterHealth, PullOnly, SourceBatch
from ingest.state.base import CheckpointStore
from ingest.webhook.sqlite import IntakeRow, SQLiteIntake


@dataclass(slots=True, frozen=True)
class IntakePosition:
    ids: tuple[int, ...]
    streams: tuple[tuple[str, str, int], ...]  # (tenant, webhook source, last intake id)


class WebhookSource(PullOnly):
    kind = "webhook"

    def __init__(
        self,
        cfg: WebhookSourceConfig,
        intake: SQLiteIntake,
        checkpoints: CheckpointStore,
        *,
        poll_seconds: float = 0.2,
        clock: Callable[[], float] = time.time,
        shard: tuple[int, int] | None = None,
        spread: bool = True,
    ) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.intake = intake
        self.checkpoints = checkpoints
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.shard = shard  # (i, n): worker i of n reads its partitions only
        self.spread = spread  # the door keys lines by entity (no repair functions configured)
        # rows cut for another shape of pod are read by worker 0 alone, the others wait until
        # they are committed (`_held`); None: not looked yet
        self._barrier: int | None = None
        self._health = AdapterHealth(status="starting")
        self._stopped = asyncio.Event()
        self._arrived = asyncio.Event()
        self._seq = 0
        self._read_through = 0
        self._oldest_uncommitted: float | None = None
        # (records, oldest received_at, bytes), refreshed by refresh_backlog
        self._backlog: tuple[int, float | None, int] = (0, None, 0)
        self.committed_records = 0  # committed out of the intake, ever: its drain rate

    def notify(self) -> None:
        """The HTTP handler appended a row: wake the reader instead of waiting for the poll."""
        self._arrived.set()

    async def start(self) -> None:
        self._health.status = "idle"

    async def stop(self) -> None:
        self._stopped.set()
        self._arrived.set()

    async def close(self) -> None:
        await self.stop()

    async def refresh_backlog(self) -> tuple[int, float | None, int]:
        self._backlog = await self.intake.backlog()
        return self._backlog

    def health(self) -> AdapterHealth:
        oldest = self._backlog[1]
        self._health.lag_seconds = 0.0 if oldest is None else max(0.0, self.clock() - oldest)
        self._health.extra["intake_backlog_records"] = self._backlog[0]
        return self._health

    async def batches(self) -> AsyncIterator[SourceBatch]:
        while not self._stopped.is_set():
            held = await self._held()
            rows, through = (
                ([], self._read_through)
                if held
                else await self.intake.scan(
                    self._read_through, self.cfg.batch_size, self.shard, self._barrier or 0
                )
            )
            self._read_through = through
            if not rows:
                self._health.status = "idle"
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), self.poll_seconds)
                continue
            self._health.status = "running"
            rows = await self._fill(rows)
            raws: list[RawRecord] = []
            last_by_stream: dict[tuple[str, str], int] = {}
            for row in rows:
                for line in row.lines:
                    self._seq += 1
                    raws.append(
                        RawRecord(
                            data=line,
                            tenant=row.tenant,
                            source=row.source,
                            seq=self._seq,
                            position=row.id,
                            event_time=row.received_at,
                            meta={"intake_id": row.id},
                        )
                    )
                last_by_stream[(row.tenant, row.source)] = row.id
            self._health.records_read += len(raws)
            pos = IntakePosition(
                ids=tuple(r.id for r in rows),
                streams=tuple((t, s, i) for (t, s), i in last_by_stream.items()),
            )
            first = raws[0].seq if raws else self._seq
            yield SourceBatch(records=raws, position=pos, first_seq=first, last_seq=self._seq)

    async def _held(self) -> bool:
        """True while this worker must not read: rows cut for another shape of pod (another
        `workers` count, or keyed by tenant) wait in the intake, and this is not worker 0.

        Why: an entity's rows from before the change may be in a row another worker reads
        now. Worker 0 reads every row up to the last such one, in id order, with its own; the
        others start once those are committed, so an entity's records are still judged in
        the order they arrived (docs/architecture.md, Scale-out). Looked at once, at the
        start: the door of this pod cuts rows of this shape only."""
        if self.shard is None:
            return False
        if self._barrier is None:
            self._barrier = await self.intake.foreign_through(self.shard[1], self.spread)
        if not self._barrier or self.shard[0] == 0:
            return False
        oldest = await self.intake.oldest()
        if oldest is not None and oldest <= self._barrier:
            return True
        self._barrier = 0
        return False

    async def _fill(self, rows: list[IntakeRow]) -> list[IntakeRow]:
        """Let a short batch fill: wait until its oldest request is `linger_seconds` old, then
        read on up to `batch_size`.

        Why: a batch costs the worker a fixed ~4 ms (its store and sink transactions) besides
        ~25 us a record, and the runner reads one batch ahead, right after handing one over,
        when little has arrived. Near capacity every batch was one or two requests: the cost
        per record doubled (bench/bench_steady.py: 72 against 37 us), 80 % of the peak was more
        than the worker could do, and the backlog grew until batches were full again, at the
        closed loop's bound (p95 lag 18.8 s). Waiting at most the linger keeps batches full at
        any rate; a backlog already older than the linger is read at once.

        Never longer than the linger: `received_at` is the wall clock of whichever process
        appended the row, and a clock can step back (NTP) or run ahead of this one; unbounded,
        a step back of an hour made a batch wait an hour."""
        have = sum(len(r.lines) for r in rows)
        linger = self.cfg.linger_seconds
        wait = min(rows[0].received_at + linger - self.clock(), linger)
        if have >= self.cfg.batch_size or wait <= 0:
            return rows
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), wait)
        more, self._read_through = await self.intake.scan(
            self._read_through, self.cfg.batch_size - have, self.shard, self._barrier or 0
        )
        return rows + more

    async def commit(self, batch: SourceBatch) -> None:
        pos: IntakePosition = batch.position
        for tenant, source, last_id in pos.streams:
            await self.checkpoints.save(tenant, source, {"intake_id": last_id})
        await self.intake.delete_through(pos.ids)
        self.committed_records += len(batch.records)
        self._health.last_checkpoint = {"intake_id": pos.ids[-1]}
        self._health.last_checkpoint_at = self.clock()
