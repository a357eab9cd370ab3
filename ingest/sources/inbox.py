"""The local inbox directory: drop files into `<inbox>/<tenant>/`, each is read once.

Formats by name: `.jsonl`/`.ndjson`/`.json` (JSON lines), `.csv`, and either with `.gz`.
A file is taken once its size and mtime have been stable for `settle_seconds` and its name does
not start with `.` or end in `.tmp`/`.part` (write elsewhere and rename into the inbox for
instant pickup). Files of one tenant are read one at a time in (mtime, name) order.

Progress: the checkpoint `checkpoint:<tenant>:<source>` holds the file being read and the byte
offset (in the decompressed stream) after the last committed batch; a restart resumes there.
Batches never span files and are cut every `batch_size` lines from the checkpointed offset, so
a crash replays exactly the same batches. When a file's last batch is committed the file moves
to `<inbox>/<tenant>/done/`: it is never taken twice.

Several workers of one pod (`workers` > 1) share the inbox through leases, as S3/SFTP workers
share a bucket (`ingest.state.leases`): a worker reads a file only under its lease (item
`<tenant>/<file>`, version = the file's identity), renewed while any of its batches is
uncommitted; the lease row's offset is then what a restart resumes from, and the checkpoint
key mirrors the last commit. Files of one tenant may then be read by two workers at once, so
their order across files holds only per worker (the sinks' revision guard keeps the data
right either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ingest.config import InboxSourceConfig
from ingest.formats import Line, LineReader, detect_format
from ingest.records import RawRecord
from ingest.sources.base import AdapterHealth, SourceBatch
from ingest.state.base import CheckpointStore
from ingest.state.leases import LeaseStore

_TENANT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SKIP_SUFFIXES = (".tmp", ".part", ".partial", ".filepart")
DONE_DIR = "done"


@dataclass(slots=True, frozen=True)
class InboxPosition:
    tenant: str
    file: str
    id: str  # inode:mtime_ns, so a new file reusing a done file's name is read afresh
    offset: int  # decompressed bytes consumed after this batch
    last: bool  # the file ends with this batch


class InboxSource:
    kind = "inbox"

    def __init__(
        self,
        cfg: InboxSourceConfig,
        checkpoints: CheckpointStore,
        *,
        settle_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
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
        self._health = AdapterHealth(status="starting")
        self._stopped = asyncio.Event()
        self._seq = 0
        self._sizes: dict[Path, tuple[int, float, float]] = {}  # path -> (size, mtime, first seen)
        self._pending_mtimes: dict[tuple[str, str], float] = {}  # (tenant, file) -> mtime
        self._warned: set[Path] = set()
        self._reading: set[Path] = set()  # read (maybe fully) but last batch not yet committed
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
        self._health.extra["path"] = str(self.root)
        self._health.extra["files_pending"] = len(self._pending_mtimes)
        return self._health

    # ------------------------------------------------------------------ reading
    async def batches(self) -> AsyncIterator[SourceBatch]:
        while not self._stopped.is_set():
            produced = False
            for tenant_dir in self._tenant_dirs():
                tenant = tenant_dir.name
                path = await self._take_file(tenant_dir)
                if path is None:
                    continue
                produced = True
                self._health.status = "running"
                self._reading.add(path)
                async for batch in self._read_file(tenant, path):
                    yield batch
                    if self._stopped.is_set():
                        return
            if not produced:
                self._health.status = "idle"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), self.cfg.poll_seconds)

    def _tenant_dirs(self) -> list[Path]:
        try:
            entries = sorted(self.root.iterdir())
        except OSError as exc:
            self._health.error(f"cannot list inbox {self.root}: {exc.strerror}")
            return []
        dirs = []
        for entry in entries:
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            if not _TENANT.match(entry.name):
                self._warn_once(entry, f"skipping {entry}: not a valid tenant id directory name")
                continue
            dirs.append(entry)
        return dirs

    async def _take_file(self, tenant_dir: Path) -> Path | None:
        """The oldest ready file of the tenant this worker may read (leased, with leases)."""
        ready = self._ready_files(tenant_dir)
        if self._leases is None:
            return ready[0] if ready else None
        for path in ready:
            try:
                version = _identity(path.stat())
            except FileNotFoundError:  # another worker just finished it
                continue
            item = f"{tenant_dir.name}/{path.name}"
            if await self._leases.try_acquire(
                self.name, item, version, self._owner, self._lease_ttl
            ):
                self._held[item] = version
                return path
        return None

    def _ready_files(self, tenant_dir: Path) -> list[Path]:
        """The tenant's settled, readable files, oldest first."""
        now = self.clock()
        ready: list[tuple[float, str, Path]] = []
        present: set[str] = set()
        for entry in tenant_dir.iterdir():
            present.add(entry.name)
            if (
                not entry.is_file()
                or entry.name.startswith(".")
                or entry.name.endswith(_SKIP_SUFFIXES)
                or entry in self._reading
            ):
                continue
            try:
                detect_format(entry.name)
            except ValueError:
                self._warn_once(entry, f"skipping {entry}: unknown format (use .jsonl, .csv, .gz)")
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # moved to done/ by another worker meanwhile
                continue
            self._pending_mtimes[(tenant_dir.name, entry.name)] = st.st_mtime
            seen = self._sizes.get(entry)
            if seen is None or seen[:2] != (st.st_size, st.st_mtime):
                self._sizes[entry] = (st.st_size, st.st_mtime, now)
                seen = self._sizes[entry]
            settled = now - max(seen[2], st.st_mtime) >= self.settle_seconds
            if settled:
                ready.append((st.st_mtime, entry.name, entry))
        for key in [k for k in self._pending_mtimes if k[0] == tenant_dir.name]:
            if key[1] not in present:  # finished (by another worker, with leases)
                del self._pending_mtimes[key]
        return [path for _, _, path in sorted(ready)]

    async def _read_file(self, tenant: str, path: Path) -> AsyncIterator[SourceBatch]:
        saved = await self.checkpoints.load(tenant, self.name)
        st = path.stat()
        mtime = st.st_mtime
        identity = _identity(st)
        start = 0
        if self._leases is not None:
            # The lease row's offset is authoritative: whoever read the file last saved it.
            start = await self._leases.offset(self.name, f"{tenant}/{path.name}")
        elif saved and saved.get("file") == path.name and saved.get("id") == identity:
            if saved.get("complete"):
                # Committed in full before a crash, not yet moved: finish the move only.
                yield self._batch(
                    [],
                    InboxPosition(tenant, path.name, identity, int(saved.get("offset", 0)), True),
                )
                return
            start = int(saved.get("offset", 0))
        batch_size = self.cfg.batch_size
        raws: list[RawRecord] = []
        last_offset = start
        file_lines = _FileLines(path, start)
        lines = iter(file_lines)
        while True:
            chunk = await asyncio.to_thread(_take, lines, batch_size - len(raws))
            header = file_lines.reader.header
            for line in chunk:
                raw = self._raw(tenant, path, line, mtime)
                if line.decoded is not None and header is not None:
                    raw.meta["csv_header"] = header  # redrive rebuilds the row from the DLQ
                raws.append(raw)
                last_offset = line.offset
            exhausted = len(raws) < batch_size
            if raws or exhausted:
                pos = InboxPosition(tenant, path.name, identity, last_offset, exhausted)
                yield self._batch(raws, pos)
                raws = []
            if exhausted:
                return

    def _raw(self, tenant: str, path: Path, line: Line, mtime: float) -> RawRecord:
        self._seq += 1
        raw = RawRecord(
            data=line.data,
            tenant=tenant,
            source=self.name,
            seq=self._seq,
            position=line.offset,
            event_time=mtime,
            decoded=line.decoded,
        )
        if line.error:
            raw.meta["reject"] = {
                "kind": "corrupt_file",
                "message": line.error,
                "file": path.name,
                "offset": line.offset,
            }
        return raw

    def _batch(self, raws: list[RawRecord], pos: InboxPosition) -> SourceBatch:
        self._health.records_read += len(raws)
        first = raws[0].seq if raws else self._seq
        return SourceBatch(records=raws, position=pos, first_seq=first, last_seq=self._seq)

    # ------------------------------------------------------------------ committing
    async def commit(self, batch: SourceBatch) -> None:
        pos: InboxPosition = batch.position
        tenant_dir = self.root / pos.tenant
        item = f"{pos.tenant}/{pos.file}"
        if self._leases is not None:
            await self._leases.save_offset(self.name, item, self._owner, pos.offset)
        if not pos.last:
            await self.checkpoints.save(
                pos.tenant, self.name, {"file": pos.file, "id": pos.id, "offset": pos.offset}
            )
        else:
            done_dir = tenant_dir / DONE_DIR
            done_dir.mkdir(exist_ok=True)
            src = tenant_dir / pos.file
            # Checkpoint first: a crash after it and before the move re-reads nothing.
            await self.checkpoints.save(
                pos.tenant,
                self.name,
                {"file": pos.file, "id": pos.id, "offset": pos.offset, "complete": True},
            )
            if src.exists():
                os.replace(src, _free_name(done_dir, pos.file))
            if self._leases is not None:
                await self._leases.mark_done(self.name, item, pos.id, self._owner)
                self._held.pop(item, None)
            self._pending_mtimes.pop((pos.tenant, pos.file), None)
            self._sizes.pop(src, None)
            self._reading.discard(src)
        self._health.last_checkpoint = {
            "tenant": pos.tenant,
            "file": pos.file,
            "offset": pos.offset,
            "complete": pos.last,
        }
        self._health.last_checkpoint_at = self.clock()

    def _warn_once(self, path: Path, message: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            self._health.error(message)


class _FileLines:
    """The lines of one file from an offset, and its CSV header once read (for the DLQ)."""

    def __init__(self, path: Path, start: int) -> None:
        fmt, gzipped = detect_format(path.name)
        seek = start if fmt == "jsonl" and not gzipped else 0
        self.reader = LineReader(fmt, gzipped, start, input_offset=seek)
        self.path = path
        self.seek = seek

    def __iter__(self) -> Iterator[Line]:
        with self.path.open("rb") as fh:
            fh.seek(self.seek)
            while chunk := fh.read(1 << 20):
                yield from self.reader.feed(chunk)
        yield from self.reader.finish()


def _identity(st: os.stat_result) -> str:
    """inode:mtime_ns: a new file that reuses a done file's name is a new version."""
    return f"{st.st_ino}:{st.st_mtime_ns}"


def _take(lines: Iterator[Line], n: int) -> list[Line]:
    out: list[Line] = []
    for line in lines:
        out.append(line)
        if len(out) >= n:
            break
    return out


def _free_name(directory: Path, name: str) -> Path:
    """done/<name>, or done/<name>.<n> if a file of that name was done before."""
    target = directory / name
    n = 1
    while target.exists():
        target = directory / f"{name}.{n}"
        n += 1
    return target
