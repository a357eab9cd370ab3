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

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._health.status = "idle"

    async def stop(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        self._stopped.set()

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
                path = self._next_file(tenant_dir)
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

    def _next_file(self, tenant_dir: Path) -> Path | None:
        """The oldest settled, readable file of the tenant, or None."""
        now = self.clock()
        ready: list[tuple[float, str, Path]] = []
        for entry in tenant_dir.iterdir():
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
            st = entry.stat()
            self._pending_mtimes[(tenant_dir.name, entry.name)] = st.st_mtime
            seen = self._sizes.get(entry)
            if seen is None or seen[:2] != (st.st_size, st.st_mtime):
                self._sizes[entry] = (st.st_size, st.st_mtime, now)
                seen = self._sizes[entry]
            settled = now - max(seen[2], st.st_mtime) >= self.settle_seconds
            if settled:
                ready.append((st.st_mtime, entry.name, entry))
        if not ready:
            return None
        return min(ready)[2]

    async def _read_file(self, tenant: str, path: Path) -> AsyncIterator[SourceBatch]:
        saved = await self.checkpoints.load(tenant, self.name)
        st = path.stat()
        mtime = st.st_mtime
        identity = f"{st.st_ino}:{st.st_mtime_ns}"
        start = 0
        if saved and saved.get("file") == path.name and saved.get("id") == identity:
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
