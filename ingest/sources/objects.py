"""The part S3 and SFTP sources share: list, lease, stream lines, batch, commit, finish.

A subclass only says how to list items (objects/files), how to stream one item's bytes and what
to do once an item is finished (SFTP moves the file). Everything about correctness lives here:

* Each listing pass looks at *every* item and skips only (item, version) pairs in the lease
  store's done-set, so an item that sorts below earlier ones, or shows up late, is still read,
  and a changed version (ETag, size+mtime) is read again.
* An item is read only under a lease (`ingest.state.leases`), renewed in the background while
  any of its batches is unread or uncommitted, so N workers never read one item at once.
* Bytes are streamed through `ingest.formats.LineReader` (never whole), cut into batches that
  run across items (small objects still make full batches: each batch costs a fixed round of
  work downstream); the next items are leased and their first bytes fetched while one is read.
* `commit(batch)` saves, in one lease-store round trip, the offset of every item the batch
  holds lines of (the lease row: authoritative for resume) and marks done the items whose
  last line it holds once nothing else of them is open, then mirrors the batch's last position
  in the checkpoint key; an item whose end was read after its last batch was cut is marked
  done when that is seen. Never before every batch of it is committed: a restart (or another
  worker after the lease TTL) resumes at the committed offset, so committed records are never
  re-read and uncommitted ones are.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ingest.config import S3SourceConfig, SFTPSourceConfig
from ingest.formats import (
    DEFAULT_MAX_LINE_BYTES,
    Line,
    detect_format,
    read_lines,
    reject_meta,
)
from ingest.records import RawRecord
from ingest.sources.base import AdapterHealth, PullOnly, SourceBatch
from ingest.state.base import CheckpointStore
from ingest.state.leases import LeaseStore

Clock = Callable[[], float]
# Items being leased and fetched while the one before them is read: their lease and GET round
# trips overlap (a 1,000-line object is read in a few ms; its lease + GET took 30-90 ms at
# load). Each holds its first lines and at most `_read_ahead`'s chunks: memory stays bounded.
OPEN_AHEAD = 3
CfgT = TypeVar("CfgT", S3SourceConfig, SFTPSourceConfig)


@dataclass(frozen=True, slots=True)
class ItemRef:
    """One version of an object or file: `name` (key/path), `version` (ETag/size+mtime)."""

    name: str
    version: str
    size: int
    mtime: float  # LastModified / mtime, epoch seconds: the records' event time


@dataclass(slots=True)
class _ItemState:
    ref: ItemRef
    open_batches: int = 0  # batches holding its records, yielded, not yet committed
    buffered: int = 0  # its records read into the pass's buffer, not yet in a batch
    read_to: int = 0  # offset just after its last line yielded in a batch
    ended: bool = False  # the reader reached the end of the item


@dataclass(slots=True)
class _Opened:
    """An item leased for reading, its line stream started (`first`: None if empty)."""

    state: _ItemState
    lines: AsyncGenerator[list[Line], None]
    first: list[Line] | None


class _Buffer:
    """Records read in a pass and not yet in a batch, in read order, with the run of
    records each item has in it (items follow each other: one run per item)."""

    def __init__(self) -> None:
        self.records: list[RawRecord] = []
        self._runs: list[list[Any]] = []  # [state, count], in order

    def add(self, state: _ItemState, records: list[RawRecord]) -> None:
        if not records:
            return
        self.records += records
        state.buffered += len(records)
        if self._runs and self._runs[-1][0] is state:
            self._runs[-1][1] += len(records)
        else:
            self._runs.append([state, len(records)])

    def take(self, n: int) -> tuple[list[RawRecord], list[tuple[_ItemState, RawRecord]]]:
        """The first `n` records, and (item, its last record among them) for each item."""
        records, self.records = self.records[:n], self.records[n:]
        spans: list[tuple[_ItemState, RawRecord]] = []
        at = 0
        while at < n:
            run = self._runs[0]
            k = min(run[1], n - at)
            at += k
            run[0].buffered -= k
            spans.append((run[0], records[at - 1]))
            if k == run[1]:
                self._runs.pop(0)
            else:
                run[1] -= k
        return records, spans

    def drop(self, state: _ItemState) -> None:
        """Forget the records of `state` (its lease was lost: they are not ours to deliver)."""
        if self._runs and self._runs[-1][0] is state:
            _, count = self._runs.pop()
            del self.records[len(self.records) - count :]
            state.buffered = 0

    def forget(self) -> None:
        """The pass ends without delivering these records: each item they belong to is read
        again from its last yielded offset (`read_to`) by a later pass."""
        for state, _ in self._runs:
            state.buffered = 0
            state.ended = False
        self.records, self._runs = [], []


class SourceFailure(Exception):
    """A listing/reading failure already put in words, with how long to wait before retrying;
    `unreachable` when the server could not be reached at all (tools exit 3 on it)."""

    def __init__(self, message: str, retry_after: float, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.unreachable = unreachable


class ItemSource(PullOnly, ABC, Generic[CfgT]):
    """Base of S3Source and SFTPSource (built from their config, worker id and stores);
    see the module docstring."""

    kind: str
    name_field = "key"  # names of the item and version in positions and checkpoints
    version_field = "etag"

    def __init__(
        self,
        cfg: CfgT,
        checkpoints: CheckpointStore,
        leases: LeaseStore,
        *,
        worker_id: str,
        clock: Clock = time.time,
        lease_ttl: float | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.cfg: CfgT = cfg
        self._shard = shard  # (i, n): worker i of n tries its stripe of a listing first
        self.name = cfg.name
        self.tenant = cfg.tenant
        self._batch_size = cfg.batch_size
        self._poll = cfg.poll_seconds
        self._checkpoints = checkpoints
        self._leases = leases
        self._worker = worker_id
        self._clock = clock
        self._ttl = cfg.lease_ttl_seconds if lease_ttl is None else lease_ttl
        self._chunk = 1 << 20
        self._max_line = max_line_bytes
        self._health = AdapterHealth()
        self._stop = asyncio.Event()
        self._go = asyncio.Event()  # clear while the runner holds (`pause`): no list, no lease
        self._go.set()
        self._wake = asyncio.Event()  # set by resume() and stop(): a poll's wait ends at once
        self._seq = 0
        self._items: dict[str, _ItemState] = {}  # items this worker holds a lease on
        self._unfinished: dict[str, float] = {}  # item -> mtime, not yet done (any worker)
        self._resume: dict[str, Any] = {}  # the checkpoint loaded at start
        self._renewer: asyncio.Task[None] | None = None
        self._warned: set[tuple[str, str]] = set()
        self._failures = 0  # consecutive failed calls to the server, for backoff
        self.setup()

    # -- what a subclass provides ---------------------------------------------------------

    def setup(self) -> None:
        """The subclass's own state, once `cfg` and the common state are set."""

    @abstractmethod
    async def list_items(self) -> list[ItemRef]:
        """Every item currently in the bucket prefix / directory that is ready to read."""

    @abstractmethod
    def open_item(self, ref: ItemRef, start: int) -> AsyncGenerator[bytes, None]:
        """The item's bytes from byte `start` (0 unless the format allows seeking)."""

    @abstractmethod
    def describe(self, exc: Exception) -> SourceFailure:
        """Put a driver's exception in words (reason code first) with a retry delay."""

    async def finished(self, ref: ItemRef) -> None:
        """Called once an item is done and committed (SFTP moves it to processed/)."""

    async def after_listing(self, refs: list[ItemRef], done: dict[str, str]) -> None:
        """Hook after each listing pass (SFTP retries moves of done files still present)."""

    async def close_client(self) -> None:
        """Close connections."""

    # -- Source protocol ------------------------------------------------------------------

    async def start(self) -> None:
        self._stop.clear()
        self._resume = await self._checkpoints.load(self.tenant, self.name) or {}
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_loop(), name=f"{self.name}-leases")
        self._health.status = "running"

    async def batches(self) -> AsyncIterator[SourceBatch]:
        while not self._stop.is_set():
            await self._go.wait()
            if self._stop.is_set():
                break
            try:
                async for batch in self._pass():
                    yield batch
            except Exception as exc:  # a failed pass is reported and retried, never fatal
                failure = exc if isinstance(exc, SourceFailure) else self.describe(exc)
                self._health.status = "error"
                self._health.error(failure.message)
                await self._sleep(failure.retry_after)
                continue
            if not self._stop.is_set():
                self._health.status = "idle" if not self._unfinished else "running"
                await self._sleep(self._poll)

    async def commit(self, batch: SourceBatch) -> None:
        """One lease-store round trip for the batch (every item's offset, and done for the
        items it finished), then the checkpoint. Idempotent until it returns (the runner
        retries it through outages): the item states change only after both writes."""
        pos = batch.position
        entries = pos.get("items") or [[pos[self.name_field], pos[self.version_field],
                                        pos["offset"]]]  # fmt: skip
        mine: list[_ItemState] = []
        finished: dict[str, str] = {}
        for name, version, _ in entries:
            state = self._items.get(name)
            if state is not None and state.ref.version == version:
                mine.append(state)
                if state.open_batches == 1 and self._complete_but_one(state):
                    finished[name] = version
        offsets = [(name, int(offset)) for name, _, offset in entries]
        await self._leases.commit(self.name, self._worker, offsets, finished)
        checkpoint = {k: v for k, v in pos.items() if k != "items"}
        await self._checkpoints.save(self.tenant, self.name, checkpoint)
        self._health.last_checkpoint = checkpoint
        self._health.last_checkpoint_at = self._clock()
        for state in mine:
            state.open_batches -= 1
            if state.ref.name in finished:
                await self._finished(state)
            else:  # its end was read meanwhile (or by this batch): done now, one more write
                await self._finish_if_complete(state)

    async def pause(self) -> None:
        """The runner holds (an operator's pause or drain, or downstream keeping it
        waiting): a read waiting in `batches()` lists nothing and leases nothing more until
        `resume()` (the items already leased ahead finish opening; their leases are kept)."""
        self._go.clear()
        await super().pause()

    async def resume(self) -> None:
        """Go on, listing at once: a source held through its poll's wait would otherwise
        sit out the rest of `poll_seconds` after an operator's resume."""
        self._go.set()
        self._wake.set()
        await super().resume()

    async def stop(self) -> None:
        self._stop.set()
        self._go.set()  # a held read ends: `batches()` ends after the read in progress
        self._wake.set()
        self._health.status = "stopped"

    def health(self) -> AdapterHealth:
        oldest = min(self._unfinished.values(), default=None)
        self._health.lag_seconds = 0.0 if oldest is None else max(0.0, self._clock() - oldest)
        return self._health

    async def close(self) -> None:
        """Stop renewing and give up held leases so another worker need not wait the TTL."""
        await self.stop()
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        for item in list(self._items):
            with contextlib.suppress(Exception):
                await self._leases.release(self.name, item, self._worker)
        self._items.clear()
        await self.close_client()

    # -- replay ---------------------------------------------------------------------------

    async def window(self, start: float, end: float) -> list[ItemRef]:
        """Items with event time in [start, end), oldest first (for replay plans)."""
        refs = await self.list_items_all()
        return sorted((r for r in refs if start <= r.mtime < end), key=lambda r: (r.mtime, r.name))

    async def list_items_all(self) -> list[ItemRef]:
        """For replay: every item including finished ones (SFTP adds processed/)."""
        return await self.list_items()

    async def read_records(self, ref: ItemRef, start: int = 0) -> AsyncIterator[list[RawRecord]]:
        """An item's records without leases or checkpoints (replay re-reads on purpose)."""
        async for lines in self._lines(ref, start):
            yield self._records(ref, lines)

    # -- the listing pass -----------------------------------------------------------------

    async def _pass(self) -> AsyncIterator[SourceBatch]:
        """Read every pending item this worker can lease, in order, into batches of
        `batch_size` that run across items (an item's tail and the next items' heads share a
        batch), so small objects still make full batches; the last batch of a pass is what is
        left. The next OPEN_AHEAD items are leased and their first bytes fetched while one is
        read."""
        # Both at once: an item done between the two reads is refused by `acquire` anyway
        refs, done = await asyncio.gather(self.list_items(), self._leases.done_versions(self.name))
        pending = sorted(
            (r for r in refs if done.get(r.name) != r.version), key=lambda r: (r.mtime, r.name)
        )
        self._unfinished = {r.name: r.mtime for r in pending}
        for state in self._items.values():  # ours, listed or not, until committed
            self._unfinished.setdefault(state.ref.name, state.ref.mtime)
        await self.after_listing(refs, done)
        mine, others = self._stripes(pending)
        buf = _Buffer()
        ahead: deque[asyncio.Task[_Opened | None]] = deque()
        try:
            for part in (mine, others):
                if part is others and others:
                    # The others' stripes, for what their workers have not taken (slow, gone,
                    # or a listing that differs). Most are done or held by now: asking again
                    # which are done spares a lease attempt on each of those, and what this
                    # worker read is delivered first, not after those attempts.
                    if buf.records:
                        yield self._batch(buf, len(buf.records))
                    done = await self._leases.done_versions(self.name)
                    part = [r for r in others if done.get(r.name) != r.version]
                todo = iter(part)
                while True:
                    # held (`pause`) mid-pass: what is leased stays leased (renewed) and what
                    # was read stays in `buf`; nothing more is leased before `resume`
                    await self._go.wait()
                    while len(ahead) < OPEN_AHEAD and (ref := next(todo, None)) is not None:
                        ahead.append(asyncio.create_task(self._open_ref(ref)))
                    if not ahead:
                        break
                    opened = await ahead[0]
                    ahead.popleft()
                    if opened is None:
                        continue  # not ours (another worker's lease, done, unsupported)
                    async for batch in self._read(opened, buf):
                        yield batch
                    if self._stop.is_set():
                        return
            if buf.records:
                yield self._batch(buf, len(buf.records))
        finally:
            for task in ahead:
                await _discard(task)
            buf.forget()  # read, never yielded (stopping, or an error): read again later

    def _stripes(self, pending: list[ItemRef]) -> tuple[list[ItemRef], list[ItemRef]]:
        """Worker i of n: items i, i+n, i+2n, ... of the listing first, then the rest. The
        workers of a pod list the same items in the same order, so their stripes do not meet:
        walking one list in the same order, each lost half of its lease attempts to the other
        (~200 of 400 with two workers and 200 objects; its first batch waited for twice the
        lease round trips). Leases stay the authority: stripes only order the attempts."""
        if self._shard is None or self._shard[1] <= 1:
            return pending, []
        i, n = self._shard
        return pending[i::n], [r for k, r in enumerate(pending) if k % n != i]

    async def _open_ref(self, ref: ItemRef) -> _Opened | None:
        """`ref` leased by this worker, its first lines already fetched (None if it is not
        to be read now): OPEN_AHEAD of these run while the item before them is read."""
        if self._stop.is_set():
            return None
        held = self._items.get(ref.name)
        if held is not None and held.ref.version != ref.version and not held.ended:
            if held.open_batches:
                return None  # replaced mid-read: let the old version's batches commit first
            del self._items[ref.name]  # then read the new version from its start
            held = None
        if held is not None and (held.ref.version != ref.version or held.ended):
            return None  # fully read: wait for its commits first
        if held is None:
            got = await self._leases.acquire(
                self.name, ref.name, ref.version, self._worker, self._ttl
            )
            if got is None:
                return None
            held = self._items[ref.name] = _ItemState(ref)
        else:
            got = await self._leases.offset(self.name, ref.name)
        return await self._open(held, got)

    async def _open(self, state: _ItemState, committed: int) -> _Opened | None:
        ref = state.ref
        start = max(state.read_to, committed)
        if (self._resume.get(self.name_field), self._resume.get(self.version_field)) == (
            ref.name,
            ref.version,
        ):
            start = max(start, int(self._resume.get("offset", 0)))
        try:
            detect_format(ref.name)
        except ValueError as exc:
            await self._unsupported(state, str(exc))
            return None
        lines = self._lines(ref, start)
        try:
            first = await anext(lines, None)
        except BaseException:
            await lines.aclose()
            raise
        return _Opened(state, lines, first)

    async def _read(self, opened: _Opened, buf: _Buffer) -> AsyncIterator[SourceBatch]:
        """Add the item's records to `buf`, yielding a batch whenever it holds `batch_size`."""
        state, ref, size = opened.state, opened.state.ref, self._batch_size
        self._health.status = "running"
        async with contextlib.aclosing(opened.lines) as rest:
            lines = opened.first
            while lines is not None:
                buf.add(state, self._records(ref, lines))
                while len(buf.records) >= size:
                    yield self._batch(buf, size)
                    if self._stop.is_set():
                        return  # stopping: leave the rest unread
                if self._items.get(ref.name) is not state:
                    buf.drop(state)  # the lease was lost: the new holder reads the rest
                    return
                lines = await anext(rest, None)
        state.ended = True
        await self._finish_if_complete(state)

    async def _lines(self, ref: ItemRef, start: int) -> AsyncGenerator[list[Line], None]:
        fmt, gzipped = detect_format(ref.name)
        seek = start if fmt == "jsonl" and not gzipped else 0
        past_end = seek and seek >= ref.size  # nothing left to fetch: no ranged GET beyond it
        chunks = _nothing() if past_end else _read_ahead(self.open_item(ref, seek))
        async with contextlib.aclosing(chunks):
            async for lines in read_lines(
                chunks, fmt, gzipped, start, self._max_line, input_offset=seek
            ):
                yield lines

    def _records(self, ref: ItemRef, lines: list[Line]) -> list[RawRecord]:
        """Lines as RawRecords; the hot loop of every object source, so locals only."""
        tenant, source, mtime, seq = self.tenant, self.name, ref.mtime, self._seq
        nf, vf, name, version = self.name_field, self.version_field, ref.name, ref.version
        out: list[RawRecord] = []
        append = out.append
        for line in lines:
            seq += 1
            pos = {nf: name, vf: version, "offset": line.offset}
            rec = RawRecord(line.data, tenant, source, seq, pos, mtime, line.decoded, {})
            if line.error is not None:
                rec.meta["reject"] = reject_meta(line, "corrupt_object", key=name)
            append(rec)
        self._seq = seq
        return out

    def _batch(self, buf: _Buffer, n: int) -> SourceBatch:
        """The first `n` records of `buf` as a batch; its position is the checkpoint (the last
        record's item and offset) plus `items`: [name, version, offset] of every item it
        holds records of, each item's offset being that of its last record in the batch."""
        records, spans = buf.take(n)
        items: list[list[Any]] = []
        for state, last in spans:
            offset = int(last.position["offset"])
            state.read_to = offset
            state.open_batches += 1
            items.append([state.ref.name, state.ref.version, offset])
        self._health.records_read += len(records)
        return SourceBatch(
            records=records,
            position={**records[-1].position, "worker": self._worker, "items": items},
            first_seq=records[0].seq,
            last_seq=records[-1].seq,
        )

    async def _finish_if_complete(self, state: _ItemState) -> None:
        if not self._complete(state):
            return
        ref = state.ref
        await self._leases.mark_done(self.name, ref.name, ref.version, self._worker)
        await self._finished(state)

    def _complete_but_one(self, state: _ItemState) -> bool:
        """Complete once the one batch still open (the one being committed) is."""
        return state.ended and not state.buffered and self._items.get(state.ref.name) is state

    async def _finished(self, state: _ItemState) -> None:
        """Marked done in the lease store: forget it, and the subclass's `finished`."""
        ref = state.ref
        if self._items.get(ref.name) is not state:
            return  # already finished (the reader and a commit both saw it complete)
        self._items.pop(ref.name, None)
        if self._unfinished.get(ref.name) == ref.mtime:
            del self._unfinished[ref.name]
        try:
            await self.finished(ref)
        except Exception as exc:  # retried after the next listing (after_listing)
            self._health.error(self.describe(exc).message)

    def _complete(self, state: _ItemState) -> bool:
        """Read to its end, every record in a batch, every such batch committed."""
        return not state.open_batches and self._complete_but_one(state)

    async def _unsupported(self, state: _ItemState, message: str) -> None:
        key = (state.ref.name, state.ref.version)
        if key not in self._warned:
            self._warned.add(key)
            self._health.error(f"skipping {state.ref.name}: {message}")
        self._items.pop(state.ref.name, None)
        self._unfinished.pop(state.ref.name, None)
        await self._leases.release(self.name, state.ref.name, self._worker)

    # -- leases and waiting ---------------------------------------------------------------

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            for item in list(self._items):
                try:
                    ok = await self._leases.renew(self.name, item, self._worker, self._ttl)
                except Exception as exc:
                    self._health.error(f"lease store unreachable while renewing {item}: {exc}")
                    continue
                if not ok:
                    self._health.error(f"lease on {item} lost to another worker; not reading on")
                    self._items.pop(item, None)

    async def _sleep(self, seconds: float) -> None:
        """Wait `seconds`, or less if the source is resumed or stopped meanwhile (a resume
        before the wait began does not shorten it)."""
        if not self._stop.is_set():
            self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)


async def _read_ahead(
    chunks: AsyncGenerator[bytes, None], depth: int = 2
) -> AsyncGenerator[bytes, None]:
    """Fetch the next chunks while the caller parses this one (network and CPU overlap);
    at most `depth` chunks wait, so memory stays bounded."""
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(depth)

    async def pump() -> None:
        try:
            async for chunk in chunks:
                await queue.put(chunk)
            await queue.put(None)
        except Exception as exc:
            await queue.put(exc)
        finally:
            await chunks.aclose()

    task = asyncio.create_task(pump())
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _discard(ahead: asyncio.Task[_Opened | None]) -> None:
    """Cancel an item opened ahead and never read (the pass ended): its stream is closed;
    its lease stays held and its state kept, so a later pass reads it from `read_to`."""
    if not ahead.done():
        ahead.cancel()
    (opened,) = await asyncio.gather(ahead, return_exceptions=True)
    if isinstance(opened, _Opened):
        with contextlib.suppress(Exception):
            await opened.lines.aclose()


async def _nothing() -> AsyncGenerator[bytes, None]:
    return
    yield b""  # an async generator that yields nothing


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff for reconnects: 0.5, 1, 2, ... capped."""
    return float(min(cap, base * 2.0 ** max(0, attempt)))
