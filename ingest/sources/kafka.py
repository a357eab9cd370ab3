"""Kafka source: a consumer-group member that commits an offset only once its batch is durable.

Why it is shaped this way:

* librdkafka's consumer blocks, so every consumer call (consume, commit, seek, close, and
  therefore the rebalance callbacks, which run inside consume) happens on ONE dedicated poll
  thread, and the event loop only awaits futures. Commits run there too, between two reads:
  a synchronous commit made from a second thread while this one loops in consume() was
  starved (confluent-kafka 2.16 / librdkafka 2.16: the OffsetCommit left only when a
  consume() happened to return at the right moment; 0.4-5.5 s per commit once the topic was
  drained, and a small script with a thread looping in consume(5000, 0.1) kept a commit
  from another thread waiting for good). Fetching does not wait for a commit: librdkafka's
  broker thread fetches in the background into its queue; a commit only delays the hand-off
  of the next batch by its round trip (~10-20 ms). A read waits at most POLL_TIMEOUT_S for
  messages, in slices of COMMIT_SLICE_S: the commits asked for meanwhile are made between
  two slices, all of them in one round trip, so a commit waits at most one slice behind a
  read of a drained topic (it waited a whole read before: the last 2-3 commits of a
  bench_kafka run, one after the other, took ~0.1 s each, 0.2 s of a 4.3 s run at 200k).
* Offsets are never auto-committed nor auto-stored: `commit(batch)` commits offset+1 per
  partition for the highest offset of that batch, after the worker made it durable.
* Each assignment of a partition gets a new *epoch*; a batch remembers the epoch it was read
  in. A later `commit(batch)` for a partition revoked (or sought) since is a no-op for that
  partition (logged and counted in `skipped_commits`): the new owner re-reads from the last
  committed offset and idempotency absorbs the repeat. Nothing of an old epoch can move the
  group's offset.
* `pause()` (the runner holds: drain, pause, downstream keeping it waiting) pauses the
  assigned partitions at once; a read asked for meanwhile (read ahead, or one waiting on an
  idle topic) reads nothing until `resume()`; the watcher polls in the background from its
  next tick (WATCH_INTERVAL_S, <= 1 s later). A held member must keep polling: its rebalance
  callbacks run only inside consume(), so a member that does not poll holds up every
  rebalance of its group (another pod's worker joining waits for it) and the synchronous
  commits of its own batches still settling, which queue behind that rebalance (a 5 s
  delay here made a drain's last commits arrive 5.5 s late). `stop()` (shutdown;
  `batches()` ends) pauses and polls at once. Either way the member stays in the group past
  max.poll.interval.ms and still answers rebalances; `resume()` continues exactly where
  reading was held and wakes the leaders' broker threads (`_wake_fetchers`: with nothing to
  fetch they see a resume only on their own 1 s timer). The runner calls them; the source
  does not guess a hold from how long its iterator was left alone.
* After a start or a resume the first reads are small (RAMP: 1,000, 2,000, 4,000 records,
  then `batch_size`): the pipeline behind the reader is empty, and its first COPY and commit
  wait for the first batch's read, admission and decode (bench_kafka at 200k: the first
  commit ~0.28 s sooner after the resume, median of 18 workers at load 5-11).

* A commit the broker refuses (a rebalance in progress: ILLEGAL_GENERATION; the coordinator
  restarting) leaves the offset in `durable`. The next batch's commit carries it, but the last
  batch before a quiet spell has no next one: the watcher retries it on its next tick
  (WATCH_INTERVAL_S) for partitions this member still owns in the same epoch, so the group's
  offset reaches what is durable without new traffic (a broker restart left one partition
  432 offsets behind for good: the e2e restart test's CI failure).
  A refusal is not an error by itself (a rebalance passes), but offsets durable and not
  committed for longer than `cfg.commit_stuck_seconds` (30) are: `health()` says status
  `error` with a `problem` naming the partitions, since when and the broker's answer, until a
  commit succeeds (`uncommitted_since` shows the wait before that). `last_checkpoint_at` moves
  only when a commit succeeds.

* A watcher task keeps the lag true while nobody reads: librdkafka's statistics (the usual
  source of the high watermark) arrive only from inside consume() and only for partitions
  being fetched, so they say nothing for a partition not yet fetched, nor while the runner
  is drained/paused (it stops pulling batches) or the source is stopped. When a partition's
  high watermark is older than WATERMARK_STALE_S, the watcher asks the broker (ListOffsets,
  and the group's committed offset when this member knows none) through a small admin
  client, awaited on the loop, at most every WATERMARK_STALE_S.

Lag (`health().lag_seconds`, the max over partitions, and `partition_lag()`): per partition,
now minus the timestamp of the oldest message read but not yet committed; with nothing in
flight but unread messages behind the high watermark, now minus the moment this member first
saw that backlog (a lower bound on the unread message's age that never overstates a burst);
0 when caught up. `offsets_behind` is the high watermark minus the committed offset (what
`kafka-consumer-groups.sh --describe` calls LAG); with no committed offset at all, minus the
offset reading starts at (`auto.offset.reset`: the low watermark for `earliest`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import orjson
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from ingest.config import KafkaSourceConfig
from ingest.kafka_log import Repeats, client_logger
from ingest.records import RawRecord
from ingest.sources.base import AdapterHealth, SourceBatch
from ingest.timefmt import iso

log = logging.getLogger(__name__)

TP = tuple[str, int]  # (topic, partition)
# SourceBatch.position of this source: per partition, (epoch it was read in, highest offset).
KafkaPosition = dict[TP, tuple[int, int]]

# How long a read waits for messages: bounds how long a commit (same thread) waits behind
# an idle read, and how long stop()/close() wait for the poll thread
POLL_TIMEOUT_S = 0.1
COMMIT_SLICE_S = 0.01  # a read waits in slices this long; commits asked for go in between
CALL_TIMEOUT_S = 10.0  # broker round trips made on purpose (offsets_for_times, watermarks)
WATCH_INTERVAL_S = 1.0  # how often the watcher looks at watermarks and the iterator
WATERMARK_STALE_S = 2.0  # a high watermark older than this is fetched from the broker
WATERMARK_TIMEOUT_S = 2.0  # per request of that refresh: never hold the poll thread long
WAKE_TIMEOUT_S = 0.5  # _wake_fetchers' metadata request (on resume, on the poll thread)
WAKE_SEND_S = 0.001  # _wake_fetchers' ListOffsets: sent, its answer not waited for
IDLE_READ_S = 0.01  # a held member's keepalive read; then the poll thread is free until
IDLE_EVERY_S = 0.2  # its next read, this long after the last (or until resume())
RAMP = (1000, 2000, 4000)  # sizes of the first reads after a start or resume: _ramp_up
_EARLIEST = ("earliest", "smallest", "beginning")
_LATEST: OffsetSpec = OffsetSpec.latest()  # type: ignore[no-untyped-call]
_EARLIEST_SPEC: OffsetSpec = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
# settings of cfg.extra the offsets admin client shares with the consumer
_ADMIN_PREFIXES = ("security.", "sasl.", "ssl.", "socket.", "broker.", "client.dns", "metadata.")
_T = TypeVar("_T")


@dataclass(slots=True)
class _Partition:
    """What this member knows about one partition it owns, for one epoch."""

    epoch: int
    committed: int | None = None  # the offset we last committed (next to read), this epoch
    durable: int | None = None  # highest offset+1 the worker declared durable, this epoch
    durable_since: float | None = None  # clock() since `durable` is ahead of `committed`
    inflight: deque[tuple[int, float]] = field(default_factory=deque)  # (first offset, ts)
    start: int | None = None  # first offset read this epoch
    next_offset: int | None = None  # offset after the last message read
    hi: int | None = None  # high watermark: statistics while fetching, else the watcher
    hi_at: float | None = None  # time.monotonic() of the last fresh high watermark
    reset_at: int | None = None  # where reading starts with no committed offset (watcher)
    group_committed: int | None = None  # committed offset librdkafka reports, from statistics
    behind_since: float | None = None  # when unread messages were first seen


class _Tenant(msgspec.Struct):
    """The one field the source reads from a record (the decoder reads the rest)."""

    tenant_id: Any = None


_tenant_of = msgspec.json.Decoder(_Tenant).decode


def tp_name(key: TP) -> str:
    return f"{key[0]}[{key[1]}]"


class KafkaSource:
    """`ingest.sources.base.Source` over a Kafka consumer group (classic protocol)."""

    kind = "kafka"

    def __init__(
        self,
        cfg: KafkaSourceConfig,
        *,
        max_record_bytes: int = 1_048_576,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._max_bytes = max_record_bytes
        self._clock = clock
        self._consumer: Any = None
        self._poll_pool = ThreadPoolExecutor(1, thread_name_prefix=f"kafka-poll-{cfg.name}")
        self._state = threading.Lock()  # brief: guards _parts against health() and the loop
        self._commit_lock = threading.Lock()  # a commit and a revocation never interleave
        # commit() calls not yet made, for the poll thread: see _serve_commits
        self._asked: list[tuple[KafkaPosition, asyncio.Future[None]]] = []
        self._asked_lock = threading.Lock()
        self._parts: dict[TP, _Partition] = {}
        self._epochs: dict[TP, int] = {}  # survives revocation: a re-assignment is a new epoch
        self._held: list[Any] = []  # messages read while paused, handed out first on resume
        self._seq = 0
        self._stopping = False
        self._closed = False
        self._iterating = False
        self._keepalive: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._repeats = Repeats()  # errors logged once per window: ingest.kafka_log
        self._recommit: asyncio.Future[None] | None = None  # the watcher's retry: _retry_commits
        self._paused = False  # partitions paused by pause()/stop(); _read un-pauses
        self._paused_tps: set[TP] = set()  # every partition paused since: see _unpause
        self._ramp: list[int] = []  # the next reads' sizes after a start or resume: _ramp_up
        self._holding = False  # pause(): the runner does not pull for now
        self._go = asyncio.Event()  # clear while held (pause): batches() reads nothing more
        self._go.set()
        self._unhold = asyncio.Event()  # set by resume()/close(): the keepalive's pause ends
        self._admin_client: AdminClient | None = None  # offsets only: see _refresh_offsets
        self._next_refresh = 0.0  # monotonic: no watermark refresh before (backoff on errors)
        reset = str(cfg.extra.get("auto.offset.reset", "earliest"))
        self._reset_earliest = reset in _EARLIEST
        self._health = AdapterHealth()
        self._refusal: str | None = None  # the broker's last answer to a refused commit
        self.skipped_commits = 0  # partitions of commit() calls ignored: revoked since read

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        conf: dict[str, Any] = {
            "bootstrap.servers": self.cfg.brokers,
            "group.id": self.cfg.group_id,
            "group.protocol": "classic",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",  # a new group starts at the oldest message
            "partition.assignment.strategy": "cooperative-sticky",
            "statistics.interval.ms": 1000,
            "client.id": f"ingest-{self.cfg.name}",
            "error_cb": self._on_error,
            "stats_cb": self._on_stats,
            "logger": client_logger(self.cfg.name),
            **self.cfg.extra,
        }

        def create() -> None:
            consumer = Consumer(conf)
            consumer.subscribe(
                list(self.cfg.topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self._consumer = consumer

        await self._on_poll_thread(create)
        self._ramp_up()
        self._health.status = "running"
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(), name=f"kafka-watch-{self.name}"
        )

    async def batches(self) -> AsyncIterator[SourceBatch]:
        self._iterating = True
        try:
            while not self._stopping and not self._closed:
                if not self._go.is_set():
                    # held: a read asked for (read ahead, or waiting on an idle topic) reads
                    # nothing until resume(); it would un-pause the partitions (`_read`)
                    await self._go.wait()
                    continue
                batch = await self._on_poll_thread(self._read)
                if batch is not None:
                    yield batch
        finally:
            self._iterating = False
            self._start_keepalive()

    async def commit(self, batch: SourceBatch) -> None:
        position: KafkaPosition = batch.position or {}
        if self._closed:
            log.warning("%s: commit after close ignored; the batch will be read again", self.name)
            return
        if position:
            done = asyncio.get_running_loop().create_future()
            with self._asked_lock:
                self._asked.append((position, done))
            # made by the read in progress between two of its slices, else by this job
            self._poll_pool.submit(self._serve_commits)
            await done

    async def pause(self) -> None:
        """The runner holds: the assigned partitions are paused now (nothing more is fetched);
        from the watcher's next tick on, it polls in the background so the member stays
        in the group and answers rebalances, however long the hold lasts."""
        if self._holding or self._closed or self._consumer is None:
            return
        self._holding = True
        self._go.clear()
        self._unhold.clear()
        self._health.status = "paused"
        await self._on_poll_thread(self._pause_assigned)

    async def stop(self) -> None:
        """Stop fetching: `batches()` ends after the current read; partitions get paused."""
        self._stopping = True
        self._go.set()  # a held iterator ends
        self._unhold.clear()
        self._health.status = "paused"
        if not self._iterating:
            self._start_keepalive()

    async def resume(self) -> None:
        """Undo `pause()` or `stop()`: fetching continues where it was held (after a
        `stop()`, iterate `batches()` again)."""
        if self._closed:
            return
        self._stopping = False
        self._holding = False
        self._ramp_up()
        self._unhold.set()  # the keepalive between two reads stops now, not after its pause
        if self._keepalive is not None:
            await self._keepalive
            self._keepalive = None

        await self._on_poll_thread(self._unpause)
        self._go.set()
        self._health.status = "running"

    async def close(self) -> None:
        if self._closed:
            return
        self._stopping = True
        self._closed = True
        self._go.set()
        self._unhold.set()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._recommit is not None:
            await asyncio.gather(self._recommit, return_exceptions=True)
        if self._keepalive is not None:
            await self._keepalive
        if self._consumer is not None:
            # commit what the worker made durable but a broker error kept uncommitted, then
            # leave the group (close() runs the revoke callback, which commits nothing new)
            await asyncio.get_running_loop().run_in_executor(self._poll_pool, self._commit_sync)
            await self._on_poll_thread(self._consumer.close)
        self._poll_pool.shutdown(wait=True)
        self._health.status = "stopped"

    # -- replay and observation --------------------------------------------------------------

    async def seek_to_time(self, ts: float) -> dict[TP, int]:
        """Move every assigned partition to its first message at or after `ts` (the end if
        none): a replay. In-flight batches of those partitions will commit nothing."""
        return await self._on_poll_thread(lambda: self._seek_sync(ts))

    def partition_lag(self) -> dict[str, dict[str, float | int]]:
        now = self._clock()
        with self._state:
            return {tp_name(k): _lag(p, now) for k, p in sorted(self._parts.items())}

    def health(self) -> AdapterHealth:
        parts = self.partition_lag()
        self._health.lag_seconds = max(
            (float(p["lag_seconds"]) for p in parts.values()), default=0.0
        )
        self._health.extra["partitions"] = parts
        self._health.extra["skipped_commits"] = self.skipped_commits
        self._judge_commits()
        return self._health

    def _judge_commits(self) -> None:
        """Status `error` with a `problem` while offsets durable in the sinks have waited
        longer than `commit_stuck_seconds` for a commit the broker refuses; back by itself
        once a commit succeeds."""
        now = self._clock()
        with self._state:
            waiting = sorted(
                (p.durable_since, key)
                for key, p in self._parts.items()
                if p.durable_since is not None and p.durable != p.committed
            )
        since = waiting[0][0] if waiting and not self._closed else None
        self._health.extra["uncommitted_since"] = since
        health = self._health
        if since is None:
            self._refusal = None  # of partitions revoked since: not what a next wait meets
        if since is None or now - since < self.cfg.commit_stuck_seconds:
            if health.problem is not None:
                health.problem = None
                if health.status == "error":
                    health.status = "paused" if self._stopping or self._holding else "running"
            return
        names = [tp_name(key) for _, key in waiting]
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        refusal = self._refusal
        health.status = "error"
        health.problem = (
            f"Kafka commits {'refused' if refusal else 'unanswered'} for {now - since:.0f}s "
            f"(since {iso(since)}): offsets of {shown} are durable in the sinks but not "
            f"committed to group {self.cfg.group_id}; "
            + (f"the broker's last answer: {refusal}" if refusal else "no answer yet")
            + ". Retried every second; until one succeeds a restart re-reads everything since "
            "(idempotency absorbs the repeats)"
        )

    # -- poll thread ---------------------------------------------------------------------------

    async def _on_poll_thread(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._poll_pool, fn)

    def _read(self) -> SourceBatch | None:
        if self._paused:  # held by pause()/stop() before this read
            self._unpause()
        want = self._ramp[-1] if self._ramp else self.cfg.batch_size
        if self._held:
            msgs, self._held = self._held[:want], self._held[want:]
        else:
            msgs = self._consume(want)
        if not msgs:
            return None
        if self._ramp:  # a step is a read that got something
            self._ramp.pop()
        return self._to_batch(msgs)

    def _ramp_up(self) -> None:
        """The first reads after a start or a resume are RAMP records, then batch_size: the
        pipeline behind the reader is empty, and its first COPY (and first commit) waits for
        the first batch's read, admission and decode, which a small batch shortens."""
        self._ramp = [n for n in RAMP if n < self.cfg.batch_size][::-1]

    def _consume(self, want: int, timeout: float = POLL_TIMEOUT_S) -> list[Any]:
        """Up to `want` messages within `timeout`, as one consume() would return them,
        but read in slices of COMMIT_SLICE_S with the commits asked for meanwhile made in
        between: a commit no longer waits for a read of a drained topic to run out. With
        nothing read and not yet committed no commit can be asked for: one consume() then
        (a reader slicing an idle topic used 1.6-2.0 % of a core, one whole read 0.7 %)."""
        consumer = self._consumer
        deadline = time.monotonic() + timeout
        if not self._asked and not any(p.inflight for p in self._parts.values()):
            return list(consumer.consume(want, timeout))
        msgs: list[Any] = consumer.consume(want, COMMIT_SLICE_S)
        while len(msgs) < want:
            if self._asked:
                self._serve_commits()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            msgs.extend(consumer.consume(want - len(msgs), min(COMMIT_SLICE_S, left)))
        return msgs

    def _serve_commits(self) -> None:
        """Make every commit asked for so far, in one broker round trip (poll thread).
        Each batch's position is noted as durable in the order asked, as separate commits
        would have, and the one commit carries the highest durable offset per partition."""
        with self._asked_lock:
            asked, self._asked = self._asked, []
        if not asked:
            return
        error: BaseException | None = None
        try:
            self._commit_sync(*(position for position, _ in asked))
        except Exception as exc:  # the callers' to raise, not the read's
            error = exc
        for _, done in asked:
            with contextlib.suppress(RuntimeError):  # its loop closed: nobody waits any more
                done.get_loop().call_soon_threadsafe(_answer, done, error)

    def _to_batch(self, msgs: list[Any]) -> SourceBatch | None:
        # The hot loop (~10 us/record budget): parse outside the lock, one bookkeeping step
        # per partition after. Only this thread changes which partitions are in _parts.
        now = self._clock()
        parts, name, max_bytes = self._parts, self.name, self._max_bytes
        tenant_of, default_tenant = _tenant_of, self.cfg.tenant or "unknown"
        records: list[RawRecord] = []
        append = records.append
        first: dict[TP, tuple[int, float]] = {}
        last: dict[TP, int] = {}
        seq = self._seq
        # consume() hands out each partition's messages in runs: a partition is looked up
        # once a run, not once a message
        key: TP = ("", -1)
        run_topic, run_pid, owned, new_run = "", -1, False, False
        for m in msgs:
            if m.error() is not None:
                if m.error().code() != KafkaError._PARTITION_EOF:
                    self._health.error(f"consume: {m.error().str()}")
                continue
            topic, pid = m.topic(), m.partition()
            if pid != run_pid or topic != run_topic:
                run_topic, run_pid, key = topic, pid, (topic, pid)
                owned = key in parts  # not: revoked since it was fetched; the new owner reads it
                new_run = key not in first
            if not owned:
                continue
            ts_type, ts_ms = m.timestamp()
            ts = now if ts_type == TIMESTAMP_NOT_AVAILABLE else ts_ms / 1000.0
            offset: int = m.offset()
            if new_run:
                first[key] = (offset, ts)
                new_run = False
            last[key] = offset
            value: bytes | None = m.value()
            # The tenant header (set by the webhook intake from the URL) is authoritative, so
            # the decoder can refuse a body whose tenant_id differs; then the record, then config.
            header_tenant = header_source = None
            if m.headers() is not None:
                header_tenant, header_source = self._headers(m)
            seq += 1
            if value is not None and len(value) <= max_bytes:
                try:
                    # a JSON object's tenant_id alone, in C; the decoder parses it once, typed
                    tenant = tenant_of(value).tenant_id
                    if not value.isascii():  # msgspec skips the other fields unchecked: bytes
                        value.decode()  # that are not UTF-8 are judged by the full parse
                except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):  # or too deep
                    append(self._unread(value, header_tenant, header_source or name, seq, key,
                                        offset, ts))  # fmt: skip
                    continue
                if header_tenant is not None:
                    tenant = header_tenant
                elif type(tenant) is not str:
                    tenant = default_tenant
                append(
                    RawRecord(value, tenant, header_source or name, seq, (topic, pid, offset), ts)
                )
            else:
                append(
                    RawRecord(
                        value or b"",
                        header_tenant or default_tenant,
                        header_source or name,
                        seq,
                        (*key, offset),
                        ts,
                        None,
                        {"reject": self._reject(value)},
                    )
                )
        self._seq = seq
        if not records:
            return None
        position: KafkaPosition = {}
        with self._state:
            for key, (offset, ts) in first.items():
                part = parts[key]
                part.inflight.append((offset, ts))
                if part.start is None:
                    part.start = offset
                position[key] = (part.epoch, last[key])
                part.next_offset = last[key] + 1
                _note_backlog(part, now)
        if self._health.status == "error" and self._health.problem is None:
            self._health.status = "running"  # reading again (stuck commits say otherwise)
        self._health.records_read += len(records)
        return SourceBatch(records, position, records[0].seq, records[-1].seq)

    def _unread(
        self,
        value: bytes,
        header_tenant: str | None,
        source: str,
        seq: int,
        key: TP,
        offset: int,
        ts: float,
    ) -> RawRecord:
        """A value the tenant reader refused, judged as before it existed: not JSON is
        rejected here; other JSON (an array, say) goes to the decoder, which says why."""
        meta: dict[str, Any] = {}
        body: dict[str, Any] | None = None
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            meta["reject"] = {"kind": "json", "message": f"not valid JSON: {exc}"}
        else:
            if type(parsed) is dict:  # an object msgspec refused but orjson reads
                body = parsed
        tenant = header_tenant or (body.get("tenant_id") if body is not None else None)
        if type(tenant) is not str:
            tenant = self.cfg.tenant or "unknown"
        return RawRecord(value, tenant, source, seq, (*key, offset), ts, body, meta)

    def _reject(self, value: bytes | None) -> dict[str, str]:
        if value is None:
            return {"kind": "json", "message": "null value (a tombstone), not a record"}
        return {
            "kind": "size",
            "message": f"message is {len(value)} bytes, over the {self._max_bytes}-byte limit",
        }

    def _headers(self, m: Any) -> tuple[str | None, str | None]:
        """(tenant, source) from the message headers; the intake sets both."""
        tenant = source = None
        for k, v in m.headers() or ():
            if k == self.cfg.tenant_header and v:
                tenant = bytes(v).decode("utf-8", "replace")
            elif k == "source" and v:
                source = bytes(v).decode("utf-8", "replace")
        return tenant, source

    def _seek_sync(self, ts: float) -> dict[TP, int]:
        consumer = self._consumer
        assigned = consumer.assignment()
        if not assigned:
            return {}
        wanted = [TopicPartition(tp.topic, tp.partition, int(ts * 1000)) for tp in assigned]
        out: dict[TP, int] = {}
        for tp in consumer.offsets_for_times(wanted, timeout=CALL_TIMEOUT_S):
            if tp.error is not None:
                raise KafkaException(tp.error)
            offset = tp.offset
            if offset < 0:  # nothing at or after ts: continue at the end
                offset = consumer.get_watermark_offsets(
                    TopicPartition(tp.topic, tp.partition), timeout=CALL_TIMEOUT_S
                )[1]
            consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
            out[(tp.topic, tp.partition)] = offset
        with self._state:
            for key, offset in out.items():
                old = self._parts.get(key)
                part = self._parts[key] = _Partition(self._next_epoch(key), next_offset=offset)
                if old is not None:
                    part.hi, part.hi_at = old.hi, old.hi_at
                    part.group_committed = old.group_committed
            self._held = [m for m in self._held if (m.topic(), m.partition()) not in out]
        return out

    def _next_epoch(self, key: TP) -> int:
        epoch = self._epochs.get(key, 0) + 1
        self._epochs[key] = epoch
        return epoch

    # -- rebalance callbacks (run inside consume(), on the poll thread) ----------------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        if not self._paused and partitions:  # a stale pause flag from an earlier ownership
            try:
                consumer.resume(partitions)
            except KafkaException as exc:
                log.info("%s: resume on assign: %s", self.name, exc)
        with self._state:
            for tp in partitions:
                key = (tp.topic, tp.partition)
                self._parts[key] = _Partition(self._next_epoch(key))
        log.info(
            "%s: assigned %s", self.name, [tp_name((t.topic, t.partition)) for t in partitions]
        )

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # Commit what is durable (a commit that failed earlier), then forget the partitions:
        # batches of theirs still in flight will commit nothing.
        # Commits run on this same thread, so none is in flight here; the lock is only
        # tried, never waited for: a commit waited for here could be queued behind the
        # JoinGroup that this very callback holds up (librdkafka sends it on the same
        # coordinator connection), a deadlock until request timeouts.
        if self._commit_lock.acquire(blocking=False):
            try:
                self._commit_locked()
                self._forget(partitions, "revoked")
            finally:
                self._commit_lock.release()
        else:
            self._forget(partitions, "revoked")

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        # lost: the group moved on, a commit would be refused; forget without committing
        self._forget(partitions, "lost")

    def _forget(self, partitions: list[Any], why: str) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        with self._state:
            for key in keys:
                self._parts.pop(key, None)
            self._held = [m for m in self._held if (m.topic(), m.partition()) not in keys]
        log.info("%s: %s %s", self.name, why, sorted(tp_name(k) for k in keys))

    # -- watcher: watermarks and keepalive while nobody reads --------------------------------

    async def _watch(self) -> None:
        while not self._closed:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                if self._closed:
                    return
                self._retry_commits()
                if self._stale():
                    await self._refresh_offsets()
                if self._admin_client is not None:
                    self._admin_client.poll(0)  # its log lines, queued for `logger` until served
                if self._holding:
                    self._start_keepalive()  # held a while: poll, to stay in the group
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the watcher die: lag would freeze again
                log.warning("%s: watcher: %s", self.name, exc)

    def _retry_commits(self) -> None:
        """Commit, on the poll thread, what is durable but was refused (see the module
        docstring); one retry in flight at a time."""
        if self._recommit is not None and not self._recommit.done():
            return
        with self._state:
            pending = any(
                p.durable is not None and p.durable != p.committed for p in self._parts.values()
            )
        if pending and not self._closed and self._consumer is not None:
            self._recommit = asyncio.get_running_loop().run_in_executor(
                self._poll_pool, self._commit_sync
            )

    def _stale(self) -> bool:
        now = time.monotonic()
        if now < self._next_refresh:
            return False
        with self._state:
            return any(
                p.hi_at is None or now - p.hi_at >= WATERMARK_STALE_S for p in self._parts.values()
            )

    async def _refresh_offsets(self) -> None:
        """High (and low) watermarks from the broker for partitions whose statistics are
        stale, and the group's committed offset where this member knows none.

        Asked through a separate admin client, batched, and awaited here: the consumer's own
        `get_watermark_offsets(cached=False)` queues behind its long-poll Fetch on the same
        connection (`fetch.wait.max.ms`, 0.5 s per partition) and would hold the poll thread.
        """
        started = time.monotonic()
        self._next_refresh = started + WATERMARK_STALE_S
        with self._state:
            stale = {
                key: p.epoch
                for key, p in self._parts.items()
                if p.hi_at is None or started - p.hi_at >= WATERMARK_STALE_S
            }
            unknown = [key for key in stale if _reading_from(self._parts[key]) is None]
        if not stale:
            return
        try:
            his = await self._list_offsets(list(stale), _LATEST)
            los = await self._list_offsets(unknown, _EARLIEST_SPEC) if unknown else {}
            group = await self._group_offsets(unknown) if unknown else {}
        except (KafkaException, TimeoutError) as exc:  # broker unreachable: retry later
            self._next_refresh = time.monotonic() + 5 * WATERMARK_STALE_S
            self._admin_client = None  # a new one: after a broker restart the old one's
            # metadata (leader epochs) can stay stale and every request fail
            log.info("%s: watermark refresh failed: %s", self.name, exc)
            return
        now, fresh = self._clock(), time.monotonic()
        with self._state:
            for key, epoch in stale.items():
                part = self._parts.get(key)
                if part is None or part.epoch != epoch or key not in his:
                    continue
                part.hi = max(part.hi or 0, his[key])
                part.hi_at = fresh
                if key in group and group[key] >= 0:
                    part.group_committed = group[key]
                elif key in group and key in los:  # no committed offset: auto.offset.reset
                    part.reset_at = los[key] if self._reset_earliest else part.hi
                _note_backlog(part, now)

    async def _list_offsets(self, keys: list[TP], spec: OffsetSpec) -> dict[TP, int]:
        futures = self._admin().list_offsets(
            {TopicPartition(*key): spec for key in keys},
            request_timeout=WATERMARK_TIMEOUT_S,
        )
        out: dict[TP, int] = {}
        for tp, fut in futures.items():
            try:
                info = await asyncio.wait_for(asyncio.wrap_future(fut), 2 * WATERMARK_TIMEOUT_S)
            except KafkaException as exc:  # this partition only (e.g. leader moving)
                log.info("%s: offsets of %s: %s", self.name, tp_name((tp.topic, tp.partition)), exc)
                self._admin_client = None  # stale metadata (FENCED_LEADER_EPOCH): start over
                continue
            if info.offset >= 0:
                out[(tp.topic, tp.partition)] = int(info.offset)
        return out

    async def _group_offsets(self, keys: list[TP]) -> dict[TP, int]:
        request = ConsumerGroupTopicPartitions(
            self.cfg.group_id, [TopicPartition(*key) for key in keys]
        )
        futures = self._admin().list_consumer_group_offsets(
            [request], request_timeout=WATERMARK_TIMEOUT_S
        )
        result = await asyncio.wait_for(
            asyncio.wrap_future(futures[self.cfg.group_id]), 2 * WATERMARK_TIMEOUT_S
        )
        return {
            (tp.topic, tp.partition): int(tp.offset)
            for tp in result.topic_partitions or ()
            if tp.error is None
        }

    def _admin(self) -> AdminClient:
        if self._admin_client is None:
            # connection and security settings only: consumer settings would be warned about
            conf: dict[str, Any] = {
                "bootstrap.servers": self.cfg.brokers,
                "client.id": f"ingest-{self.cfg.name}-offsets",
                "logger": client_logger(f"{self.cfg.name}-offsets"),
                **{k: v for k, v in self.cfg.extra.items() if k.startswith(_ADMIN_PREFIXES)},
            }
            self._admin_client = AdminClient(conf)
        return self._admin_client

    # -- keepalive while stopped ------------------------------------------------------------

    def _unpause(self) -> None:
        """Resume the assignment AND every partition paused since: librdkafka keeps the
        pause flag of a partition that is lost (e.g. a broker restart) and later assigned to
        this member again; resuming only the assignment of the moment would leave it paused,
        never fetched, for good."""
        consumer = self._consumer
        keys = self._paused_tps | {(tp.topic, tp.partition) for tp in consumer.assignment()}
        consumer.resume([TopicPartition(*key) for key in sorted(keys)])
        self._paused_tps.clear()
        self._paused = False
        self._wake_fetchers(keys)

    def _wake_fetchers(self, keys: set[TP]) -> None:
        """Have the leaders' broker threads fetch the resumed partitions now. A broker
        thread with nothing to fetch sleeps until its 1 s timer or its socket's I/O and only
        then sees a resume: a bare consumer's first message came 0.07-0.99 s after its
        resume, 0.01-0.08 s with this (bench_kafka at 200k runs 3-4 s). A request to a
        broker wakes its thread: the topic's metadata (which also names the leaders), then a
        ListOffsets to each leader (one partition a leader), sent and not waited for
        (WAKE_SEND_S: its answer queues behind the first fetch's, 54-134 ms). Best effort: if
        it fails, the fetch starts by the timer, as without it."""
        consumer = self._consumer
        topics: dict[str, list[int]] = {}
        for topic, partition in sorted(keys):
            topics.setdefault(topic, []).append(partition)
        for topic, partitions in topics.items():
            try:
                meta = consumer.list_topics(topic, timeout=WAKE_TIMEOUT_S).topics.get(topic)
            except KafkaException as exc:
                log.info("%s: waking the fetch of %s after resume: %s", self.name, topic, exc)
                meta = None
            leaders: dict[object, int] = {}
            for partition in partitions:
                known = meta.partitions.get(partition) if meta is not None else None
                leaders.setdefault(known.leader if known else ("?", partition), partition)
            for partition in leaders.values():
                with contextlib.suppress(KafkaException):  # timed out: sent, not waited for
                    consumer.get_watermark_offsets(
                        TopicPartition(topic, partition), timeout=WAKE_SEND_S, cached=False
                    )

    def _start_keepalive(self) -> None:
        idle = self._keepalive is None or self._keepalive.done()
        held = self._stopping or self._holding
        if held and not self._closed and self._consumer is not None and idle:
            self._keepalive = asyncio.get_running_loop().create_task(self._idle())

    async def _idle(self) -> None:
        """A held member reads for IDLE_READ_S, then leaves the poll thread free until its
        next read, POLL_TIMEOUT_S after the last, or until resume(): a resume waited for a
        whole 0.1-s read in progress (0-0.1 s, ~50 ms on average of a bench_kafka run's
        start), while a rebalance or a commit waits at most one short read now."""
        while (self._stopping or self._holding) and not self._closed:
            await self._on_poll_thread(self._idle_poll)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unhold.wait(), IDLE_EVERY_S - IDLE_READ_S)

    def _pause_assigned(self) -> None:
        consumer = self._consumer
        assigned = consumer.assignment()
        consumer.pause(assigned)
        self._paused = True
        self._paused_tps.update((tp.topic, tp.partition) for tp in assigned)

    def _idle_poll(self) -> None:
        self._pause_assigned()
        msgs = self._consume(self.cfg.batch_size, IDLE_READ_S)
        if msgs:  # fetched before the pause took effect: keep them, in order, for resume()
            self._held.extend(m for m in msgs if m.error() is None)

    # -- commits (poll thread, between reads, and inside consume() during revocation) -------

    def _commit_sync(self, *positions: KafkaPosition) -> None:
        with self._commit_lock:
            self._commit_locked(*positions)

    def _commit_locked(self, *positions: KafkaPosition) -> None:
        skipped: list[str] = []
        now = self._clock()
        with self._state:
            for key, (epoch, last) in (kv for position in positions for kv in position.items()):
                part = self._parts.get(key)
                if part is None or part.epoch != epoch:
                    skipped.append(tp_name(key))
                    continue
                if part.durable is None or last + 1 > part.durable:
                    part.durable = last + 1
                    if part.durable_since is None:
                        part.durable_since = now
                while part.inflight and part.inflight[0][0] <= last:
                    part.inflight.popleft()
            self.skipped_commits += len(skipped)
            todo = [
                (key, part.epoch, part.durable)
                for key, part in self._parts.items()
                if part.durable is not None and part.durable != part.committed
            ]
        if skipped:
            log.info("%s: not committing %s: revoked since read", self.name, skipped)
        if not todo or self._consumer is None:
            return
        offsets = [TopicPartition(k[0], k[1], off) for k, _, off in todo]
        try:
            results = self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            why = exc.args[0].str() if exc.args else str(exc)
            # kept in `durable`: the next commit, the watcher or the revocation retries it.
            # Not an "error" status: a broker that is down says so through _on_error, and a
            # refusal in a rebalance passes by itself
            self._health.error(f"commit: {why}")
            self._warn(f"commit refused, retried: {why}")
            self._refusal = why
            return
        failed = {(tp.topic, tp.partition) for tp in results or () if tp.error is not None}
        for tp in results or ():
            if tp.error is not None:
                self._health.error(f"commit {tp_name((tp.topic, tp.partition))}: {tp.error}")
                self._refusal = f"{tp_name((tp.topic, tp.partition))}: {tp.error}"
        if failed:
            self._warn(f"commit of {sorted(map(tp_name, failed))} refused, retried")
        done = False
        with self._state:
            for key, epoch, off in todo:
                part = self._parts.get(key)
                if key not in failed and part is not None and part.epoch == epoch:
                    part.committed = off
                    part.durable_since = None if part.durable == off else part.durable_since
                    done = True
            self._health.last_checkpoint = {
                tp_name(k): p.committed for k, p in sorted(self._parts.items()) if p.committed
            }
        if done:  # the checkpoint's age is that of the last commit the broker took
            self._health.last_checkpoint_at = self._clock()
            if not failed:
                self._refusal = None

    # -- librdkafka callbacks (inside consume(), on the poll thread) ---------------------------

    def _on_error(self, err: Any) -> None:
        self._health.error(f"kafka: {err.str()}")
        if err.fatal() or err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._health.status = "error"
        self._warn(err.str())  # ~20/s per client while a broker is down

    def _warn(self, message: str) -> None:
        """A warning, each distinct one once per window (the watcher retries a refused
        commit every second; librdkafka repeats its errors): ingest.kafka_log."""
        admitted = self._repeats.admit(message)
        if admitted is not None:
            log.warning("%s: %s", self.name, admitted)

    def _on_stats(self, raw: str) -> None:
        stats = orjson.loads(raw)
        now = self._clock()
        with self._state:
            for topic, t in stats.get("topics", {}).items():
                for pid, p in t.get("partitions", {}).items():
                    part = self._parts.get((topic, int(pid)))
                    if part is None:
                        continue
                    # a paused partition is not fetched: its hi_offset in the statistics
                    # is the last one fetched, stale; the watcher asks the broker instead
                    if p.get("hi_offset", -1) >= 0 and not self._paused:
                        part.hi = max(part.hi or 0, int(p["hi_offset"]))
                        part.hi_at = time.monotonic()
                    if p.get("committed_offset", -1) >= 0:
                        part.group_committed = int(p["committed_offset"])
                    _note_backlog(part, now)
        if (
            self._health.status == "error"
            and self._health.problem is None
            and any(
                b.get("state") == "UP" and b.get("nodeid", -1) >= 0
                for b in stats.get("brokers", {}).values()
            )
        ):
            self._health.status = "paused" if self._stopping or self._holding else "running"


def _answer(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():  # the caller was cancelled
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _note_backlog(part: _Partition, now: float) -> None:
    """Start (or end) the clock of unread messages behind the high watermark."""
    reading_at = _first(part.next_offset, part.committed, part.group_committed, part.reset_at)
    if part.hi is not None and reading_at is not None and part.hi > reading_at:
        part.behind_since = part.behind_since or now
    else:
        part.behind_since = None


def _reading_from(p: _Partition) -> int | None:
    """The partition's committed offset as far as known (else where reading began)."""
    return _first(p.committed, p.group_committed, p.start, p.reset_at)


def _lag(p: _Partition, now: float) -> dict[str, float | int]:
    committed = _reading_from(p)
    hi = max(p.hi or 0, p.next_offset or 0)
    behind = max(0, hi - committed) if committed is not None else 0
    if p.inflight:
        seconds = now - p.inflight[0][1]
    elif p.behind_since is not None:
        seconds = now - p.behind_since
    else:
        seconds = 0.0
    return {"offsets_behind": behind, "lag_seconds": round(max(0.0, seconds), 3)}
