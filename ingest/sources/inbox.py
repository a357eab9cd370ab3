"""The local inbox directory: drop files into `<inbox>/<tenant>/`, each is read once.

Formats by name: `.jsonl`/`.ndjson`/`.json` (JSON lines), `.csv`, and either with `.gz`.
A file is taken once its name does not start with `.` or end in `.tmp`/`.part` and either no
process has it open for writing (Linux read-lease probe, `_no_writer`: a file renamed into the
inbox or copied in and closed is taken at the next scan) or its size and mtime have been stable
for `settle_seconds` (where the probe cannot tell: another user's file, a filesystem without
leases, a text file not ending in a newline). Write elsewhere and rename into the inbox for
instant pickup; lines a writer appends after closing the file are read as growth (below).
Files of one tenant are read one at a time in (mtime, name) order; tenants take turns batch by
batch (and inside a long line, a few MiB at a time), so one tenant's big file never holds up
the others. An idle worker scans every `poll_seconds`; on Linux a file renamed, created or
closed after writing in the inbox wakes it at once (inotify, `ingest.sources.dirwatch`), and
the poll stays as the fallback (other OSes, network filesystems).

Progress: the checkpoint `checkpoint:<tenant>:<source>` holds the file being read and the byte
offset (in the decompressed stream) after the last committed batch; a restart resumes there.
Batches never span files and are cut every `batch_size` lines from the checkpointed offset, so
a crash replays exactly the same batches. When a file's last batch is committed the file moves
to `<inbox>/<tenant>/done/`: it is never taken twice.

Several workers of one pod (`workers` > 1) share the inbox through leases, as S3/SFTP workers
share a bucket (`ingest.state.leases`): a worker reads a file only under its lease (item
`<tenant>/<file>`, version = the file's identity), renewed while any of its batches is
uncommitted; the lease row's offset is then what a restart resumes from, and the checkpoint
key mirrors the last commit (deleting the key still starts the tenant's files over). Files
of one tenant may then be read by two workers at once, so their order across files holds only
per worker (the sinks' revision guard keeps the data right either way).

Hostile contents are contained:
* Symlinks are never followed: a symlinked tenant directory, file, `done/` or `quarantine/` is
  skipped with a health error. Directories and files are opened relative to their parent's
  descriptor with O_NOFOLLOW, so nothing outside the inbox is read, created or moved.
* A file name that is not UTF-8 cannot go in a checkpoint or a health document: the file moves
  to `<tenant>/quarantine/` (a health error says so, with the name's bytes as \\xNN); a tenant
  directory so named is skipped with a health error.
* A file that grows after it was read to its end (appended through a descriptor held open) is
  not moved: its checkpoint keeps the offset and the new bytes are read once it settles again.
  A file replaced or truncated after pickup is read again from its start (repeats are
  duplicates); growth in the instant of the move to done/ is reported as a health error.
* Lines over `max_line_bytes` (= http.max_record_bytes) are cut off unread and DLQ'd with their
  size and first bytes (ingest.formats); memory stays bounded by the read chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgspec

from ingest.config import InboxSourceConfig
from ingest.formats import (
    DEFAULT_MAX_LINE_BYTES,
    Line,
    LineReader,
    LineRun,
    detect_format,
    reject_meta,
)
from ingest.names import representable, shown, valid_name
from ingest.records import NO_META, LinesAt, RawRecord
from ingest.sources.base import AdapterHealth, PullOnly, SourceBatch
from ingest.sources.dirwatch import DirWatch
from ingest.state.base import CheckpointStore
from ingest.state.leases import LeaseStore

log = logging.getLogger(__name__)

_SKIP_SUFFIXES = (".tmp", ".part", ".partial", ".filepart")
DONE_DIR = "done"
QUARANTINE_DIR = "quarantine"
CHUNK_BYTES = 1 << 20
TURN_BYTES = 8 << 20  # bytes one tenant may read before the next tenant's turn
RETRY_SECONDS = 30.0  # before trying again to move a file whose move to done/ failed
# before trying again to open or read a file that could not be (permissions, I/O error): at
# once would spin the event loop on it, starving HTTP and every other tenant
UNREADABLE_RETRY_SECONDS = 5.0
# How long a file moved to done/ is watched for growth: a writer that paused longer than the
# settle window and wrote on appends to the moved file, and those lines would go unread
# without a word.
WATCH_MOVED_SECONDS = 300.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in for a file must not hang the open (regular files ignore it).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class LinePosition(msgspec.Struct, frozen=True, gc=False):
    """Where a record's line was (`RawRecord.position`) when it was read on its own (an
    error, a CSV row, a line after a blank or a CR...): the file and the offset just after
    the line. A DLQ entry of a line that failed decoding says so as `{"file", "offset"}`.
    Plain JSON lines read together share one `records.LinesAt` instead."""

    file: str
    offset: int


@dataclass(slots=True, frozen=True)
class InboxPosition:
    tenant: str
    file: str
    id: str  # inode:mtime_ns, so a new file reusing a done file's name is read afresh
    offset: int  # decompressed bytes consumed after this batch
    last: bool  # the file ends with this batch
    size: int = 0  # with `last`: the file's bytes read, to tell whether it grew since
    ino: int = 0
    first: bool = False  # the file's first batch read by this worker (its log lines)


class InboxSource(PullOnly):
    kind = "inbox"

    def __init__(
        self,
        cfg: InboxSourceConfig,
        checkpoints: CheckpointStore,
        *,
        settle_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        leases: LeaseStore | None = None,
        owner: str = "",
        lease_ttl: float = 30.0,
    ) -> None:
        self.name = cfg.name
        self.cfg = cfg
        if cfg.path is None:
            raise ValueError("inbox path must be resolved (Config.under_data_dir) before use")
        self.root: Path = cfg.path
        self.checkpoints = checkpoints
        self.settle_seconds = settle_seconds
        self.clock = clock
        self.max_line_bytes = max_line_bytes
        self._health = AdapterHealth(status="starting")
        self._stopped = asyncio.Event()
        self._seq = 0
        # (tenant, file) -> (size, mtime, first seen with them)
        self._sizes: dict[tuple[str, str], tuple[int, float, float]] = {}
        self._pending_mtimes: dict[tuple[str, str], float] = {}  # (tenant, file) -> mtime
        # (tenant, name in done/) -> (inode, size when moved, watched until): see _watch_moved
        self._moved: dict[tuple[str, str], tuple[int, int, float]] = {}
        self._warned: set[tuple[str, str, str]] = set()
        self._reading: set[tuple[str, str]] = set()  # read, last batch not yet committed
        self._retry_at: dict[tuple[str, str], float] = {}  # not movable, openable or readable: wait
        self._quarantined = 0
        self._leases = leases
        self._owner = owner
        self._lease_ttl = lease_ttl
        self._held: dict[str, str] = {}  # leased item -> version, until its file is done
        self._renewer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._health.status = "idle"
        if self._leases is not None and self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_loop(), name=f"{self.name}-leases")

    async def stop(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        """Stop; give up held leases so another worker need not wait for them to expire."""
        self._stopped.set()
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._leases is not None:
            for item in list(self._held):
                with contextlib.suppress(Exception):
                    await self._leases.release(self.name, item, self._owner)
            self._held.clear()

    async def _renew_loop(self) -> None:
        assert self._leases is not None
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            for item in list(self._held):
                try:
                    if not await self._leases.renew(self.name, item, self._owner, self._lease_ttl):
                        self._health.error(f"lease on {item} lost to another worker")
                except Exception as exc:
                    self._health.error(f"lease store unreachable while renewing {item}: {exc}")

    def health(self) -> AdapterHealth:
        oldest = min(self._pending_mtimes.values(), default=None)
        self._health.lag_seconds = 0.0 if oldest is None else max(0.0, self.clock() - oldest)
        self._health.extra["path"] = shown(str(self.root))
        self._health.extra["files_pending"] = len(self._pending_mtimes)
        self._health.extra["files_quarantined"] = self._quarantined
        return self._health

    # ------------------------------------------------------------------ reading
    async def batches(self) -> AsyncIterator[SourceBatch]:
        readers: dict[str, AsyncGenerator[SourceBatch | None, None]] = {}
        rescan_at = 0.0
        # A file landing wakes an idle worker at once (inotify); the poll stays the fallback.
        watch = DirWatch.open()
        if watch is not None:
            watch.watch(self.root)  # new tenant directories
        try:
            while not self._stopped.is_set():
                woken = watch is not None and watch.woken.is_set()
                if not readers or woken or time.monotonic() >= rescan_at:
                    if watch is not None:
                        watch.woken.clear()  # before the scan: what lands during it wakes again
                    for tenant in self._tenants():
                        if watch is not None:
                            watch.watch(self.root / tenant)
                        if tenant in readers:
                            continue
                        name = await self._take_file(tenant)
                        if name is not None:
                            log.debug("%s took %s/%s", self._owner, tenant, shown(name))
                            self._reading.add((tenant, name))
                            readers[tenant] = self._read_file(tenant, name)
                    rescan_at = time.monotonic() + self.cfg.poll_seconds
                if not readers:
                    self._health.status = "idle"
                    await self._idle(watch)
                    continue
                self._health.status = "running"
                for tenant, reader in list(readers.items()):  # one turn each
                    try:
                        batch = await anext(reader)
                    except StopAsyncIteration:
                        del readers[tenant]
                        rescan_at = 0.0  # its next file, if any, at once
                        continue
                    if batch is not None:
                        yield batch
                        if self._stopped.is_set():
                            return
        finally:
            if watch is not None:
                watch.close()
            for reader in readers.values():
                with contextlib.suppress(Exception):
                    await reader.aclose()

    async def _idle(self, watch: DirWatch | None) -> None:
        """Until the next poll, or sooner: stopped, or (with a watch) a file landed."""
        stop = asyncio.ensure_future(self._stopped.wait())
        waits: set[asyncio.Future[Any]] = {stop}
        if watch is not None:
            waits.add(asyncio.ensure_future(watch.woken.wait()))
        try:
            await asyncio.wait(
                waits, timeout=self.cfg.poll_seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waits:
                w.cancel()

    def _tenants(self) -> list[str]:
        try:
            with os.scandir(self.root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self._health.error(f"cannot list inbox {shown(str(self.root))}: {exc.strerror}")
            return []
        tenants = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if entry.is_symlink():
                    self._warn_once("", name, "a symlink; symlinks in the inbox are never followed")
                    continue
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            if not representable(name):
                self._warn_once("", name, "tenant directory name is not UTF-8; rename it")
            elif not valid_name(name):
                self._warn_once("", name, "not a valid tenant id directory name")
            else:
                tenants.append(name)
        return tenants

    async def _take_file(self, tenant: str) -> str | None:
        """The oldest ready file of the tenant this worker may read (leased, with leases)."""
        ready = self._ready_files(tenant)
        if self._leases is None:
            return ready[0][0] if ready else None
        for name, st in ready:
            item = f"{tenant}/{name}"
            if item in self._held:  # still ours (it grew after it was read): read on
                return name
            version = _identity(st)
            if await self._leases.try_acquire(
                self.name, item, version, self._owner, self._lease_ttl
            ):
                self._held[item] = version
                return name
        return None

    def _watch_moved(self, tenant: str) -> None:
        """Say so when a file this worker moved to done/ grew there: its writer still had it
        open (it paused longer than the settle window), and the new lines were not read."""
        now = time.monotonic()
        for key in [k for k in self._moved if k[0] == tenant]:
            ino, size, until = self._moved[key]
            try:
                st = os.stat(self.root / tenant / DONE_DIR / key[1], follow_symlinks=False)
            except OSError:
                st = None
            if st is None or st.st_ino != ino or now > until:
                del self._moved[key]
                continue
            if st.st_size > size:
                message = (
                    f"{tenant}/{DONE_DIR}/{shown(key[1])} grew by {st.st_size - size} bytes "
                    "after it was read and moved there (its writer still had it open and "
                    "paused longer than the settle window): those bytes were not read; write "
                    f"files under a temporary name (.tmp) and rename them into {tenant}/, and "
                    f"move this one back into {tenant}/ under a new name to read it"
                )
                log.warning("%s", message)
                self._health.error(message)
                self._moved[key] = (ino, st.st_size, until)

    def _ready_files(self, tenant: str) -> list[tuple[str, os.stat_result]]:
        """The tenant's settled, readable files, oldest first."""
        if self._moved:
            self._watch_moved(tenant)
        now = self.clock()
        ready: list[tuple[float, str, os.stat_result]] = []
        unsettled: list[tuple[float, str, os.stat_result]] = []
        found: list[tuple[str, os.stat_result]] = []
        try:
            with _dir_fd(self.root / tenant) as tfd, os.scandir(tfd) as it:
                for entry in it:  # stat() needs the directory's descriptor still open
                    if (
                        entry.name.startswith(".")
                        or entry.name.endswith(_SKIP_SUFFIXES)
                        or (tenant, entry.name) in self._reading
                    ):
                        continue
                    try:
                        if entry.is_symlink():
                            self._warn_once(tenant, entry.name, "a symlink; never followed")
                            continue
                        if not entry.is_file(follow_symlinks=False):
                            continue  # done/, quarantine/, other directories, FIFOs, sockets
                        found.append((entry.name, entry.stat(follow_symlinks=False)))
                    except OSError:
                        continue
        except OSError as exc:
            self._warn_once(tenant, "", f"cannot list the tenant directory: {_why(exc)}")
            return []
        present = {name for name, _ in found} | {n for t, n in self._reading if t == tenant}
        for key in [k for k in self._pending_mtimes if k[0] == tenant]:
            if key[1] not in present:  # finished (by another worker, with leases)
                del self._pending_mtimes[key]
        for name, st in found:
            if self._retry_at.get((tenant, name), 0.0) > time.monotonic():
                continue
            if not representable(name):
                self._quarantine(tenant, name)
                continue
            try:
                detect_format(name)
            except ValueError:
                self._warn_once(tenant, name, "unknown format (use .jsonl, .csv, .gz)")
                continue
            key = (tenant, name)
            self._pending_mtimes[key] = st.st_mtime
            seen = self._sizes.get(key)
            if seen is None or seen[:2] != (st.st_size, st.st_mtime):
                seen = self._sizes[key] = (st.st_size, st.st_mtime, now)
            if now - max(seen[2], st.st_mtime) >= self.settle_seconds:
                ready.append((st.st_mtime, name, st))
            elif st.st_size:
                unsettled.append((st.st_mtime, name, st))
        if unsettled:  # closed by their writers (renamed in, copied): no need to wait
            try:
                with _dir_fd(self.root / tenant) as tfd:
                    ready += [r for r in unsettled if _no_writer(tfd, r[1])]
            except OSError:
                pass  # the settle wait decides
        return [(name, st) for _, name, st in sorted(ready, key=lambda r: r[:2])]

    async def _read_file(self, tenant: str, name: str) -> AsyncGenerator[SourceBatch | None, None]:
        """The file's batches; None now and then inside a long stretch without a complete
        line, so that the other tenants get their turn."""
        try:
            fh, st = _open_file(self.root / tenant, name)
        except OSError as exc:
            self._reading.discard((tenant, name))
            self._retry_at[(tenant, name)] = time.monotonic() + UNREADABLE_RETRY_SECONDS
            self._warn_once(tenant, name, f"cannot open: {_why(exc)}")
            return
        with fh:
            identity = _identity(st)
            saved = await self.checkpoints.load(tenant, self.name)
            start = 0
            if self._leases is not None:
                # The lease row's offset is authoritative: whoever read the file last saved it.
                # Unless the checkpoint key is gone: an operator reset the source (the runbook's
                # `DEL checkpoint:<tenant>:<source>` reprocesses), so the file starts over.
                if saved is not None:
                    start = await self._leases.offset(self.name, f"{tenant}/{name}")
            elif saved and saved.get("file") == name and _same_file(saved, st, identity):
                if saved.get("complete"):
                    # Committed in full before a crash, not yet moved: finish the move only.
                    offset = int(saved.get("offset", 0))
                    pos = InboxPosition(tenant, name, identity, offset, True, st.st_size, st.st_ino)
                    yield self._batch([], pos)
                    return
                start = int(saved.get("offset", 0))
            batch_size = self.cfg.batch_size
            lines = _FileLines(fh, name, start, self.max_line_bytes)
            raws: list[RawRecord] = []
            last_offset = start
            mtime = st.st_mtime
            first = True
            while True:
                try:
                    chunk = await asyncio.to_thread(lines.take, batch_size - len(raws), TURN_BYTES)
                except OSError as exc:  # an I/O error: what is uncommitted is read again later
                    self._reading.discard((tenant, name))
                    self._retry_at[(tenant, name)] = time.monotonic() + UNREADABLE_RETRY_SECONDS
                    self._health.error(f"reading {tenant}/{shown(name)} failed: {_why(exc)}")
                    return
                header, source = lines.reader.header, self.name
                for item in chunk:
                    if isinstance(item, LineRun):
                        # Plain JSON lines (the usual case): what `_raw` makes of each, in one
                        # comprehension instead of a call per line, sharing one empty meta and
                        # one position (the run's offsets, by seq).
                        seq = self._seq
                        where = LinesAt(name, seq + 1, item.ends)
                        raws += [
                            RawRecord(data, tenant, source, i, where, mtime, None, NO_META)
                            for i, data in enumerate(item.parts, seq + 1)
                        ]
                        self._seq = seq + len(item.parts)
                        last_offset = item.ends[-1]
                        continue
                    raw = self._raw(tenant, name, item, mtime)
                    if item.decoded is not None and header is not None:
                        raw.meta["csv_header"] = header  # redrive rebuilds it from the DLQ
                    raws.append(raw)
                    last_offset = item.offset
                ended = lines.done
                if len(raws) >= batch_size or ended:
                    pos = InboxPosition(
                        tenant,
                        name,
                        identity,
                        last_offset,
                        ended,
                        lines.bytes_read,
                        st.st_ino,
                        first,
                    )
                    if first:
                        log.debug("%s read %s/%s: first batch", self._owner, tenant, shown(name))
                        first = False
                    yield self._batch(raws, pos)
                    raws = []
                    if ended:
                        return
                else:
                    yield None

    def _raw(self, tenant: str, name: str, line: Line, mtime: float) -> RawRecord:
        self._seq += 1
        raw = RawRecord(
            data=line.data,
            tenant=tenant,
            source=self.name,
            seq=self._seq,
            position=LinePosition(name, line.offset),  # a DLQ entry says where it was
            event_time=mtime,
            decoded=line.decoded,
        )
        if line.error:
            raw.meta["reject"] = reject_meta(line, "corrupt_file", file=name)
        return raw

    def _batch(self, raws: list[RawRecord], pos: InboxPosition) -> SourceBatch:
        self._health.records_read += len(raws)
        first = raws[0].seq if raws else self._seq
        return SourceBatch(records=raws, position=pos, first_seq=first, last_seq=self._seq)

    # ------------------------------------------------------------------ committing
    async def commit(self, batch: SourceBatch) -> None:
        pos: InboxPosition = batch.position
        if pos.first or pos.last:
            log.debug(
                "%s committing %s/%s: %s batch",
                self._owner,
                pos.tenant,
                shown(pos.file),
                "last" if pos.last else "first",
            )
        if self._leases is not None:
            item = f"{pos.tenant}/{pos.file}"
            await self._leases.save_offset(self.name, item, self._owner, pos.offset)
        if not pos.last:
            await self.checkpoints.save(
                pos.tenant, self.name, {"file": pos.file, "id": pos.id, "offset": pos.offset}
            )
        else:
            await self._finish(pos)
        self._health.last_checkpoint = {
            "tenant": pos.tenant,
            "file": pos.file,
            "offset": pos.offset,
            "complete": pos.last,
        }
        self._health.last_checkpoint_at = self.clock()

    async def _finish(self, pos: InboxPosition) -> None:
        """The file's last batch is durable: move it to done/ — unless it changed since."""
        key = (pos.tenant, pos.file)
        tenant_dir = self.root / pos.tenant
        done = {"file": pos.file, "id": pos.id, "offset": pos.offset, "complete": True}
        try:
            with _dir_fd(tenant_dir) as tfd:
                fd = _open_in(tfd, pos.file)
                if fd is None:  # gone (moved by hand) since it was read: nothing to move
                    await self.checkpoints.save(pos.tenant, self.name, done)
                    await self._done(pos)
                    self._forget(key)
                    return
                try:
                    before = os.fstat(fd)
                    if before.st_ino != pos.ino:
                        # Another file took the name: it is read afresh (its id differs).
                        await self.checkpoints.save(pos.tenant, self.name, done)
                        await self._release(pos)
                        self._forget(key, keep_pending=True)
                        return
                    if before.st_size != pos.size:
                        await self._changed(pos, before)
                        return
                    # Checkpoint first: a crash after it and before the move re-reads nothing.
                    await self.checkpoints.save(pos.tenant, self.name, done)
                    with _subdir_fd(tfd, DONE_DIR) as dfd:
                        target = _free_name(dfd, pos.file)
                        os.rename(pos.file, target, src_dir_fd=tfd, dst_dir_fd=dfd)
                    log.debug("%s moved %s/%s to done/", self._owner, pos.tenant, shown(target))
                    after = os.fstat(fd)
                    key_moved = (pos.tenant, target)
                    self._moved[key_moved] = (
                        after.st_ino,
                        after.st_size,
                        time.monotonic() + WATCH_MOVED_SECONDS,
                    )
                    await self._done(pos)
                finally:
                    os.close(fd)
        except OSError as exc:
            # done/ is a symlink or not a directory, the directory vanished, ...: the
            # checkpoint says complete, so a retry (next pass) only finishes the move.
            self._warn_once(pos.tenant, pos.file, f"cannot move to {DONE_DIR}/: {_why(exc)}")
            self._forget(key, keep_pending=True)
            self._retry_at[key] = time.monotonic() + RETRY_SECONDS
            return
        if after.st_size > pos.size:
            self._health.error(
                f"{pos.tenant}/{shown(pos.file)} grew by {after.st_size - pos.size} bytes while "
                f"it was moved to {DONE_DIR}/{shown(target)}: those bytes were not read; move "
                f"it back into {pos.tenant}/ under a new name to read them"
            )
        self._forget(key)

    async def _changed(self, pos: InboxPosition, now: os.stat_result) -> None:
        """The file is not what was read to its end: grown -> read the rest once it settles;
        shrunk (rewritten) -> read it again from the start. Never moved unread."""
        key = (pos.tenant, pos.file)
        if now.st_size > pos.size:
            log.info(
                "%s/%s grew by %d bytes after it was read; reading the rest",
                pos.tenant,
                shown(pos.file),
                now.st_size - pos.size,
            )
            await self.checkpoints.save(
                pos.tenant,
                self.name,
                {
                    "file": pos.file,
                    "id": _identity(now),
                    "offset": pos.offset,
                    "grown": True,
                    "ino": now.st_ino,
                    "size": pos.size,
                },
            )
        else:
            self._health.error(
                f"{pos.tenant}/{shown(pos.file)} shrank from {pos.size} to {now.st_size} bytes "
                "after it was read: reading it again from its start"
            )
            await self.checkpoints.save(
                pos.tenant, self.name, {"file": pos.file, "id": "", "offset": 0}
            )
            if self._leases is not None:  # still ours (held): read again from 0
                item = f"{pos.tenant}/{pos.file}"
                await self._leases.save_offset(self.name, item, self._owner, 0)
        self._forget(key, keep_pending=True)

    async def _done(self, pos: InboxPosition) -> None:
        if self._leases is not None:
            item = f"{pos.tenant}/{pos.file}"
            await self._leases.mark_done(self.name, item, pos.id, self._owner)
            self._held.pop(item, None)

    async def _release(self, pos: InboxPosition) -> None:
        if self._leases is not None:
            item = f"{pos.tenant}/{pos.file}"
            await self._leases.release(self.name, item, self._owner)
            self._held.pop(item, None)

    def _forget(self, key: tuple[str, str], keep_pending: bool = False) -> None:
        self._reading.discard(key)
        self._sizes.pop(key, None)
        if not keep_pending:
            self._pending_mtimes.pop(key, None)

    def _quarantine(self, tenant: str, name: str) -> None:
        """Move a file whose name is not UTF-8 to <tenant>/quarantine/, once, and say so."""
        key = (tenant, name)
        self._pending_mtimes.pop(key, None)
        try:
            with _dir_fd(self.root / tenant) as tfd, _subdir_fd(tfd, QUARANTINE_DIR) as qfd:
                target = _free_name(qfd, name)
                os.rename(name, target, src_dir_fd=tfd, dst_dir_fd=qfd)
        except OSError as exc:
            why = _why(exc)
            self._warn_once(tenant, name, f"name is not UTF-8 and cannot be quarantined: {why}")
            return
        self._quarantined += 1
        self._health.error(
            f"{tenant}/{shown(name)}: file name is not UTF-8, moved to {tenant}/{QUARANTINE_DIR}/"
            f"{shown(target)}; rename it to UTF-8 and move it back into {tenant}/ to read it"
        )

    def _warn_once(self, tenant: str, name: str, message: str) -> None:
        if (tenant, name, message) not in self._warned:
            self._warned.add((tenant, name, message))
            where = "/".join(shown(p) for p in (tenant, name) if p)
            self._health.error(f"skipping {where}: {message}")


class _FileLines:
    """The lines of one open file from an offset, a bounded amount at a time."""

    def __init__(self, fh: IO[bytes], name: str, start: int, max_line_bytes: int) -> None:
        fmt, gzipped = detect_format(name)
        seek = start if fmt == "jsonl" and not gzipped else 0
        self.reader = LineReader(
            fmt, gzipped, start, input_offset=seek, max_line_bytes=max_line_bytes, runs=True
        )
        fh.seek(seek)
        self._fh = fh
        self.bytes_read = seek  # of the file itself (compressed, for .gz)
        self._ready: deque[Line | LineRun] = deque()
        self._pieces: Iterator[list[Line | LineRun]] = iter(())
        self._eof = False

    @property
    def done(self) -> bool:
        return self._eof and not self._ready

    def take(self, n: int, budget: int) -> list[Line | LineRun]:
        """Up to n lines (a LineRun counts its lines; one is cut where n ends); fewer at the
        end of the file or once `budget` bytes were read."""
        out: list[Line | LineRun] = []
        got = read = 0
        ready = self._ready
        while got < n:
            if ready:
                item = ready.popleft()
                if type(item) is LineRun:
                    if len(item.parts) > n - got:
                        cut = n - got
                        ready.appendleft(LineRun(item.ends[cut:], item.parts[cut:]))
                        item = LineRun(item.ends[:cut], item.parts[:cut])
                    got += len(item.parts)
                else:
                    got += 1
                out.append(item)
                continue
            piece = next(self._pieces, None)
            if piece is not None:
                self._ready.extend(piece)
                continue
            if self._eof or read >= budget:
                break
            chunk = self._fh.read(CHUNK_BYTES)
            if not chunk:
                self._eof = True
                self._ready.extend(self.reader.run_finish())
                continue
            read += len(chunk)
            self.bytes_read += len(chunk)
            self._pieces = self.reader.run_pieces(chunk)
        return out


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symlink (never followed)"
    return exc.strerror or type(exc).__name__


def _identity(st: os.stat_result) -> str:
    """inode:mtime_ns: a new file that reuses a done file's name is a new version."""
    return f"{st.st_ino}:{st.st_mtime_ns}"


def _same_file(saved: dict[str, Any], st: os.stat_result, identity: str) -> bool:
    """The checkpoint is about this very file (or this file grown since it was read)."""
    if saved.get("id") == identity:
        return True
    return bool(
        saved.get("grown")
        and saved.get("ino") == st.st_ino
        and st.st_size >= int(saved.get("size", st.st_size + 1))
    )


def _open_dir(path: Path | str, parent: int | None = None) -> int:
    """O_NOFOLLOW on a symlink says ELOOP or ENOTDIR depending on the flags: say ELOOP."""
    try:
        return os.open(path, _DIR_FLAGS, dir_fd=parent)
    except NotADirectoryError:
        if stat.S_ISLNK(os.stat(path, dir_fd=parent, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, "a symlink") from None
        raise


@contextlib.contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    """A directory's descriptor; ELOOP if it is a symlink."""
    fd = _open_dir(path)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _subdir_fd(parent: int, name: str) -> Iterator[int]:
    """done/ or quarantine/ under a tenant directory, made if missing, never a symlink."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=parent)
    fd = _open_dir(name, parent)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_in(dir_fd: int, name: str) -> int | None:
    """A regular file's descriptor, None if it is gone; OSError if it is anything else."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def _no_writer(dir_fd: int, name: str) -> bool:
    """True when no process has the file open for writing right now and a text file ends
    with a whole line, so it needs no settle wait (a file renamed into the inbox, or copied in
    and closed): Linux grants a read lease only when no one has the file open for writing.
    The lease is given back at once; a writer opening the file in that instant waits for it,
    and this process gets SIGURG (ignored unless handled) rather than SIGIO (which would end
    it). False wherever leases are not to be had (another user's file, a filesystem without
    leases, not Linux): then the settle wait decides, as before."""
    setlease = getattr(fcntl, "F_SETLEASE", None)
    setsig = getattr(fcntl, "F_SETSIG", None)
    if setlease is None or setsig is None:
        return False
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not st.st_size:
            return False
        if not name.endswith(".gz") and os.pread(fd, 1, st.st_size - 1) != b"\n":
            return False  # ends inside a line: its writer may not be done with it
        fcntl.fcntl(fd, setsig, signal.SIGURG)
        fcntl.fcntl(fd, setlease, fcntl.F_RDLCK)  # EAGAIN: open for writing somewhere
        fcntl.fcntl(fd, setlease, fcntl.F_UNLCK)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _open_file(tenant_dir: Path, name: str) -> tuple[IO[bytes], os.stat_result]:
    with _dir_fd(tenant_dir) as tfd:
        fd = _open_in(tfd, name)
    if fd is None:
        raise FileNotFoundError(errno.ENOENT, "no longer there")
    os.set_blocking(fd, True)
    fh = os.fdopen(fd, "rb", buffering=0)
    return fh, os.fstat(fd)


def _free_name(dir_fd: int, name: str) -> str:
    """<name>, or <name>.<n> if a file of that name is there already."""
    target = name
    n = 1
    while True:
        try:
            os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return target
        target = f"{name}.{n}"
        n += 1
