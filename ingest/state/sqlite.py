"""Embedded state on SQLite: checkpoints, DLQ, processed counts, drops in the state file
(`state.db`); idempotency keys in a file of their own beside it (`state.idem.db`, their store
in `ingest.state.sqlite_idem`, which builds on this module's connections and writer lock; the
keys' tables' schema is in `MIGRATIONS` here, with every other table's).

`SQLiteDB` owns exactly one connection, used only from one dedicated thread, so the event loop
never blocks and there is no cross-thread locking; every store built on the same file shares
it. WAL with synchronous=NORMAL survives a process crash (kill -9) at every commit; only an OS
crash can lose the last transactions.

Several processes write one file (a pod's workers, the control plane's webhook intake, the
CLIs). Every write transaction (`immediate`) first takes the file's writer lock, an `flock`
on `<file>-lock`, and only then SQLite's own write lock, which is then free at once. A writer
that finds SQLite's lock held waits in SQLite's busy handler, which sleeps 1, 2, 5 ... 100 ms
at a time whatever the holder does: two workers writing one file lost a third of their time
asleep there (docs/benchmarks.md). A writer waiting for the writer lock is woken at its
release instead (`_flock`). It only orders the writers; exclusion and durability are SQLite's, as
before: a process without it (an older binary, a file whose lock file cannot be opened) is
still kept out by SQLite's lock and waits in the busy handler (`busy_timeout`), as does a
writer that waited `busy_timeout` for the writer lock in vain. The kernel drops the lock of a
killed process.

The schema is versioned in `schema_migrations`; `MIGRATIONS` lists every state table and is
applied in order at open. Versions are unique project-wide (the sink's start at 101) so two
components may even share a file.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson

from ingest import (
    native,
    sqlite_params,  # noqa: F401 - bytes and None bound without adaptation
)
from ingest.errors import StoreUnavailable
from ingest.records import DLQEntry, ReasonCode
from ingest.state.base import (
    DLQFilter,
    DLQGroup,
    DroppedRow,
    checkpoint_key,
    checkpoint_value,
)
from ingest.timefmt import iso

T = TypeVar("T")
Clock = Callable[[], float]

_SQLITE_CONFIG_MEMSTATUS = 9


def _without_memory_statistics() -> bool:
    """Turn SQLite's memory statistics off for the process (`SQLITE_CONFIG_MEMSTATUS`), as
    the first store import does (below); True if they were turned off here.

    With them on (the library's default), every allocation and free of SQLite's takes a
    global mutex to count itself: a bound text or blob is copied into an allocation of its
    own, so a sink batch of 5,000 rows makes ~30,000 of them under the writer lock. Off, the
    sink's thread spends ~0.6 µs a record less (docs/benchmarks.md, embsink2). Nothing here
    reads those counts (`sqlite3_memory_used`, a soft heap limit).

    The setting is taken only while SQLite is shut down, and a shutdown with a connection
    open is undefined: so only if SQLite counts its allocations (a probe allocation shows
    up) and holds none (no connection, statement or blob anywhere in the process); the
    calls hold the GIL (`PyDLL`), so no other Python thread opens one meanwhile. Otherwise,
    or where the sqlite3 module's library cannot be reached (a build with it linked in
    privately), nothing changes."""
    try:
        import _sqlite3

        lib = ctypes.PyDLL(_sqlite3.__file__)
        used, malloc, free = lib.sqlite3_memory_used, lib.sqlite3_malloc, lib.sqlite3_free
        shutdown, config, init = lib.sqlite3_shutdown, lib.sqlite3_config, lib.sqlite3_initialize
    except (ImportError, AttributeError, OSError):
        return False
    used.restype, used.argtypes = ctypes.c_int64, []
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_int]
    free.restype, free.argtypes = None, [ctypes.c_void_p]
    if used() != 0:
        return False
    probe = malloc(64)
    counted = used() > 0
    free(probe)
    if not counted or shutdown() != 0:
        return False
    off: bool = config(_SQLITE_CONFIG_MEMSTATUS, ctypes.c_int(0)) == 0
    init()
    return off


MEMORY_STATISTICS_OFF = _without_memory_statistics()

CHUNK = 900  # bound parameters per IN (...) list; below SQLite's historical 999 limit


class Migration(NamedTuple):
    """A schema step: SQL statements, or functions of the connection for steps SQL alone
    cannot say (tables named by data); all of one migration run in one transaction."""

    version: int
    name: str
    statements: tuple[str | Callable[[sqlite3.Connection], None], ...]


# ------------------------------------------- idempotency keys' tables (`ingest.state.sqlite_idem`)

# What the migrations below need of the keys' tables: they are here, with every table's
# migration (the state file gets them too: older files kept their keys there), and the store
# (`ingest.state.sqlite_idem`) imports them from here (it builds on this module).

DAY = 86_400
IDEM_PREFIX = "idem_"
# The layout of every table of keys: `idem_mid` (migration 14), the runs `idem_YYYYMMDD_N` and
# the day tables `idem_YYYYMMDD` of older code (migration 12). One B-tree per table (no expiry
# index): a table's keys all expire together, with DROP TABLE, once its newest key expired.
_IDEM_DAY_DDL = (
    "CREATE TABLE IF NOT EXISTS {} (key BLOB PRIMARY KEY, claimed_at REAL NOT NULL) WITHOUT ROWID"
)
IDEM_RECENT = "idem_recent"  # the level before the log took its place: empty (migration 16)
IDEM_MID = "idem_mid"
# Every claim's keys, one row a claim (`ingest.state.sqlite_idem`).
IDEM_LOG = "idem_log"


def idem_table(day: int) -> str:
    """`idem_20261201` for day number `day` (days since 1970-01-01 UTC): a day table of the
    code before the runs."""
    return IDEM_PREFIX + datetime.fromtimestamp(day * DAY, UTC).strftime("%Y%m%d")


def _idem_by_day(c: sqlite3.Connection) -> None:
    """Adopt the one-table layout of migration 2: unexpired keys move to their claim day's
    table, then `idem` and its expiry index go."""
    now = time.time()
    for (day,) in c.execute(
        f"SELECT DISTINCT CAST(claimed_at / {DAY} AS INTEGER) FROM idem WHERE expires_at > ?",
        (now,),
    ).fetchall():
        table = idem_table(day)
        c.execute(_IDEM_DAY_DDL.format(table))
        c.execute(
            f"INSERT OR REPLACE INTO {table} SELECT key, claimed_at FROM idem"
            " WHERE expires_at > ? AND claimed_at >= ? AND claimed_at < ?",
            (now, day * DAY, (day + 1) * DAY),
        )
    c.execute("DROP TABLE idem")


# Keys met again in a move keep their latest claim.
_UPSERT = " ON CONFLICT (key) DO UPDATE SET claimed_at = max(claimed_at, excluded.claimed_at)"


def _log_level(c: sqlite3.Connection) -> None:
    """Make `idem_log_merged` (through which log row the log's keys are in `idem_mid` or a run;
    the keys moved into `idem_mid` since it was last renamed to a run, and the newest of them)
    with every row of the log merged, after moving `idem_recent`'s keys (where the code
    before put every claim, as well as in the log) into `idem_mid`."""
    c.execute(
        f"CREATE TABLE {IDEM_LOG}_merged (one INTEGER PRIMARY KEY CHECK (one = 1),"
        " through INTEGER NOT NULL, mid_keys INTEGER NOT NULL, mid_newest REAL NOT NULL)"
    )
    c.execute(
        f"INSERT INTO {IDEM_MID} SELECT key, claimed_at FROM {IDEM_RECENT} WHERE true{_UPSERT}"
    )
    c.execute(f"DELETE FROM {IDEM_RECENT}")
    c.execute(
        f"INSERT INTO {IDEM_LOG}_merged SELECT 1, (SELECT COALESCE(max(id), 0) FROM {IDEM_LOG}),"
        f" count(*), COALESCE(max(claimed_at), 0) FROM {IDEM_MID}"
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "checkpoints",
        ("CREATE TABLE checkpoints (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",),
    ),
    Migration(
        2,
        "idempotency",
        (
            "CREATE TABLE idem (key BLOB PRIMARY KEY, claimed_at REAL NOT NULL,"
            " expires_at REAL NOT NULL) WITHOUT ROWID",
            "CREATE INDEX idem_expires ON idem (expires_at)",
        ),
    ),
    Migration(
        3,
        "dlq",
        (
            "CREATE TABLE dlq (id INTEGER PRIMARY KEY, dedupe_key BLOB NOT NULL,"
            " tenant TEXT NOT NULL, source TEXT NOT NULL, sink TEXT NOT NULL, reason TEXT NOT NULL,"
            " detail TEXT NOT NULL, payload BLOB NOT NULL, attempts INTEGER NOT NULL,"
            " first_failed_at REAL NOT NULL, last_failed_at REAL NOT NULL, entity_type TEXT,"
            " entity_id TEXT, revision INTEGER, UNIQUE (dedupe_key, sink))",
            "CREATE INDEX dlq_triage ON dlq (tenant, reason, last_failed_at)",
            "CREATE INDEX dlq_sink ON dlq (tenant, sink)",
            "CREATE INDEX dlq_first ON dlq (first_failed_at)",
        ),
    ),
    Migration(
        4,
        "processed_counts",
        (
            "CREATE TABLE processed_counts (tenant TEXT NOT NULL, source TEXT NOT NULL,"
            " count INTEGER NOT NULL, PRIMARY KEY (tenant, source)) WITHOUT ROWID",
        ),
    ),
    Migration(
        5,
        "dropped",
        (
            "CREATE TABLE dropped (id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE,"
            " tenant TEXT NOT NULL, source TEXT NOT NULL, dropped_at REAL NOT NULL,"
            " payload BLOB NOT NULL)",
            "CREATE INDEX dropped_tenant ON dropped (tenant, id)",
        ),
    ),
    Migration(
        6,
        "intake",
        (
            # body last: backlog() sums n_records without touching overflow pages
            "CREATE TABLE intake (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL,"
            " source TEXT NOT NULL, n_records INTEGER NOT NULL, received_at REAL NOT NULL,"
            " body BLOB NOT NULL)",
        ),
    ),
    Migration(
        7,
        "audit",
        (
            "CREATE TABLE audit_log (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
            " actor TEXT NOT NULL, via TEXT NOT NULL, action TEXT NOT NULL,"
            " outcome TEXT NOT NULL, remote TEXT NOT NULL, tenant TEXT, target TEXT NOT NULL,"
            " detail TEXT NOT NULL)",
            "CREATE INDEX audit_log_at ON audit_log (at)",
        ),
    ),
    Migration(
        8,
        "seen_signatures",
        (
            "CREATE TABLE seen_signatures (key BLOB PRIMARY KEY, expires_at REAL NOT NULL)"
            " WITHOUT ROWID",
        ),
    ),
    Migration(
        9,
        "intake_partition",
        # hash of the tenant: worker i of N reads the rows with part % N == i
        ("ALTER TABLE intake ADD COLUMN part INTEGER NOT NULL DEFAULT 0",),
    ),
    # Tables of stores that once created their own (IF NOT EXISTS: such files keep them).
    Migration(
        10,
        "source_leases",  # ingest.state.leases.SQLiteLeaseStore
        (
            "CREATE TABLE IF NOT EXISTS source_leases (source TEXT NOT NULL,"
            " item TEXT NOT NULL, version TEXT NOT NULL, owner TEXT NOT NULL,"
            ' lease_until REAL NOT NULL, "offset" INTEGER NOT NULL DEFAULT 0,'
            " done_version TEXT, PRIMARY KEY (source, item))",
        ),
    ),
    Migration(
        11,
        "replay_plans",  # ingest.replay.plans.SQLitePlanStore
        (
            "CREATE TABLE IF NOT EXISTS replay_plans (id TEXT PRIMARY KEY,"
            " tenant TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,"
            " doc TEXT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS replay_plans_tenant ON replay_plans (tenant, created_at)",
        ),
    ),
    # Idempotency keys in one table per claim day (SQLiteIdempotencyStore); the tables are
    # made from _IDEM_DAY_DDL as days come.
    Migration(12, "idempotency_by_day", (_idem_by_day,)),
    # The recent claims, merged into the day tables in bulk (SQLiteIdempotencyStore._merge).
    Migration(13, "idempotency_recent", (_IDEM_DAY_DDL.format(IDEM_RECENT),)),
    # The level between them (SQLiteIdempotencyStore._merge_mid).
    Migration(14, "idempotency_mid", (_IDEM_DAY_DDL.format(IDEM_MID),)),
    # Every claim's keys, appended as one row in the claim's transaction, so that each
    # process's in-memory filter of the claimed keys learns the other processes' claims
    # (SQLiteIdempotencyStore._catch_up); `idem_log_pruned` says through which id rows were
    # deleted (a process behind it builds its filter again from the levels).
    Migration(
        15,
        "idempotency_log",
        (
            f"CREATE TABLE {IDEM_LOG} (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " claimed_at REAL NOT NULL, keys BLOB NOT NULL)",
            f"CREATE TABLE {IDEM_LOG}_pruned (one INTEGER PRIMARY KEY CHECK (one = 1),"
            " through INTEGER NOT NULL)",
            f"INSERT INTO {IDEM_LOG}_pruned VALUES (1, 0)",
        ),
    ),
    # The log as the first level (SQLiteIdempotencyStore._merge): `idem_recent`'s keys move to
    # `idem_mid`, and every log row there is already is merged.
    Migration(16, "idempotency_log_level", (_log_level,)),
)


BUSY_TIMEOUT = 5.0  # seconds a writer waits for the writer lock, then as long for SQLite's
_POLL_FIRST, _POLL_MAX = 50e-6, 1e-3  # the writer lock is asked for again this often


class Connection(sqlite3.Connection):
    """A connection with its file's writer lock: an open descriptor of `<file>-lock`, or
    None (the lock file could not be opened: SQLite's busy handler alone orders writers)."""

    writer: int | None = None
    writer_timeout: float = BUSY_TIMEOUT
    shm: int | None = None  # `<file>-shm`, read for the WAL's size (`checkpoint_if_due`)
    frame_scale: int = 1  # the file's page size in 4 KiB: the checkpoint counts' divisor
    # the file's checkpoints' own thread (`Checkpointer`, made by SQLiteDB.open): None,
    # checkpoints run on this connection's thread
    checkpointer: Checkpointer | None = None

    def close(self) -> None:
        super().close()
        for name in ("writer", "shm"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)


# `ingest_native.flock_wait` (src/flock.rs), None where the extension is missing or older
_FLOCK_WAIT: Callable[[int, float], bool] | None = native.function("flock_wait")


def _flock(fd: int, timeout: float) -> bool:
    """`flock(LOCK_EX)` on `fd` within `timeout` seconds (False: not taken). A lock held by
    another writer is waited for in `ingest_native.flock_wait`: a blocking flock without the
    GIL, which the kernel wakes at the release (a timer's signal ends it at the deadline).
    The polls here (every 50 µs at first, then every 1 ms at most) took the GIL back from the
    event loop and the decoder each time and saw a release late; they remain where the
    extension is missing."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    if _FLOCK_WAIT is not None:
        return _FLOCK_WAIT(fd, timeout)
    pause, deadline = _POLL_FIRST, None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        now = time.monotonic()
        if deadline is None:
            deadline = now + timeout
        elif now >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, _POLL_MAX)


@contextmanager
def writer_lock(conn: sqlite3.Connection) -> Iterator[None]:
    """Hold the file's writer lock (see the module's docstring), if the connection has one."""
    fd: int | None = getattr(conn, "writer", None)
    held = fd is not None and _flock(fd, getattr(conn, "writer_timeout", BUSY_TIMEOUT))
    try:
        yield
    finally:
        if held:
            assert fd is not None
            fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the write lock up front (no deadlocking lock upgrade
    against another process), the file's writer lock before it, and rolls back on any
    error."""
    with writer_lock(conn):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    checkpoint_if_due(conn)


# WAL checkpoints run after the writer lock is released, not inside COMMIT: SQLite's own
# autocheckpoint runs in the COMMIT statement, so under the writer lock, and the other
# processes' writers (two workers share sink.db and state.idem.db) waited for it: the copy of
# 16 MiB of pages and its two fsyncs, a large part of a claim's wall time (docs/benchmarks.md).
# A passive checkpoint needs no write lock: writers append to the WAL meanwhile. A WAL
# restarts from its start only when a writer begins with every frame copied back, which
# writers appending during each checkpoint can keep from happening: once the WAL holds
# CHECKPOINT_LOCKED frames the checkpoint runs under the writer lock again (it then copies
# everything, and the next writer restarts the WAL). SQLite's autocheckpoint stays on as a
# backstop (writes outside `immediate` / `autocommit`, a connection whose `-shm` cannot be
# read) at WAL_BACKSTOP frames. Durability is unchanged: a commit is in the WAL either way.
# The counts are of 4 KiB frames: a file of larger pages (sink.db) checkpoints at the same
# bytes (`Connection.frame_scale`). A connection of a `SQLiteDB` hands its checkpoints to a
# thread of their own (`Checkpointer`, below: no thread that writes waits
# for them, and the writer lock is taken only for a short tail while the disk answers
# quickly); a bare connection (`_connect`: CLIs, tests) runs them itself, as described here.
CHECKPOINT_PAGES = 4000  # frames not yet copied back (16 MiB): time for a checkpoint
CHECKPOINT_LOCKED = 12000  # frames in the WAL (48 MiB): the checkpoint under the writer lock
# SQLite's autocheckpoint (128 MiB): above CHECKPOINT_FORCED (96 MiB), the most a
# Checkpointer lets the WAL grow while the disk is slow (it ran in every writer's COMMIT)
WAL_BACKSTOP = 32000
_FRAME = 4096


def _wal_frames(conn: sqlite3.Connection) -> tuple[int, int] | None:
    """(frames in the WAL, frames of them copied back) from the wal-index header at the
    start of `<file>-shm` (mxFrame at byte 16, nBackfill at byte 96, native byte order;
    sqlite.org/walformat.html), read without its locks: a hint, not a fact. None: unknown."""
    fd: int | None = getattr(conn, "shm", None)
    if fd is None:
        if not isinstance(conn, Connection):
            return None
        main = conn.execute("PRAGMA database_list").fetchone()[2]
        try:
            fd = conn.shm = os.open(f"{main}-shm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
    head = os.pread(fd, 100, 0)
    if len(head) < 100:
        return None
    return int.from_bytes(head[16:20], sys.byteorder), int.from_bytes(head[96:100], sys.byteorder)


def checkpoint_if_due(conn: sqlite3.Connection) -> None:
    """After a write transaction, outside the writer lock: once CHECKPOINT_PAGES frames wait
    to be copied back, a poke to the file's Checkpointer, or (a bare connection) a passive
    checkpoint here, under the writer lock once the WAL holds CHECKPOINT_LOCKED (see above)."""
    if conn.in_transaction:
        return
    frames = _wal_frames(conn)
    scale: int = getattr(conn, "frame_scale", 1)
    if frames is None or frames[0] - frames[1] < CHECKPOINT_PAGES // scale:
        return
    checkpointer: Checkpointer | None = getattr(conn, "checkpointer", None)
    if checkpointer is not None:
        checkpointer.poke()
        return
    if frames[0] >= CHECKPOINT_LOCKED // scale:
        with writer_lock(conn):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    else:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


# ------------------------------------------------------- checkpoints on a thread of their own

# WAL checkpoints of one SQLite file on a thread and connection of their own
# (`Checkpointer`), so that no writer's thread waits for a checkpoint's page copies and fsyncs.
#
# A checkpoint copies the WAL's pages back into the file and syncs both: the only fsyncs of a
# file in WAL mode with synchronous=NORMAL. Run after each commit on the committing thread
# (`checkpoint_if_due`, as before), one held up that thread's next write
# or read for the copy and the syncs; and once the WAL held CHECKPOINT_LOCKED frames it ran
# under the file's writer lock, so every other process's writers of the file waited too. On a
# slow disk (bench_steady's stall: iowait 30 % for ~4 s) that was seconds: the pod's claims and
# the control plane's intake appends stopped behind `fdatasync`s.
#
# Here a file's `SQLiteDB` has a `Checkpointer`: a commit only pokes it (one read of the
# wal-index header decides whether a checkpoint is due). The checkpointer copies without the
# writer lock (PASSIVE: writers append meanwhile), in passes until at most TAIL frames wait;
# only then, once the WAL holds CHECKPOINT_LOCKED frames and only if its last pass was quick
# (the disk answers), it takes the writer lock for the tail and a RESTART checkpoint, so that
# the WAL starts from its beginning at the next write. While the disk is
# slow it leaves the tail for later (the WAL grows past CHECKPOINT_LOCKED instead of writers
# waiting), until CHECKPOINT_FORCED frames, below SQLite's own autocheckpoint (the backstop,
# WAL_BACKSTOP, which would run in every writer's COMMIT). Durability is unchanged: a commit
# is in the WAL either way, and a checkpoint of any connection is SQLite's own.

SLOW = 0.25  # s: an unlocked pass slower than this says the disk is slow: the tail waits
TAIL = 256  # 4-KiB frames at most left for the pass under the writer lock
PASSES = 4  # unlocked passes at most before it
# frames in the WAL (96 MiB) past which the tail is checkpointed under the lock however slow
# the disk: below WAL_BACKSTOP (SQLite's own, in every writer's COMMIT)
CHECKPOINT_FORCED = 24000


class Checkpointer:
    """The checkpoints of the file at `path` (see the module's docstring). `poke` after a
    commit; `close` before the file's own connection closes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._due = threading.Event()
        self._closing = False
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"checkpoint-{path.name}", daemon=True
        )
        # what it did, for tests and benches: unlocked passes, passes under the writer
        # lock, tails left for later because the disk was slow
        self.passes = 0
        self.locked = 0
        self.deferred = 0

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise self._failed

    def poke(self) -> None:
        """A commit was made: look whether a checkpoint is due (on the checkpointer's thread)."""
        self._due.set()

    def close(self) -> None:
        self._closing = True
        self._due.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            conn = _checkpointer_connect(self._path)
        except BaseException as exc:  # reported by start()
            self._failed = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                self._due.wait()
                self._due.clear()
                if self._closing:
                    return
                try:
                    self.checkpoint(conn)
                except (sqlite3.Error, OSError):
                    # a checkpoint that failed (disk full, I/O error) leaves the WAL as it
                    # was: the commits are in it; the next poke tries again
                    time.sleep(0.1)
        finally:
            conn.close()

    def checkpoint(self, conn: sqlite3.Connection) -> None:
        """If due: unlocked passes, then the tail under the writer lock if the disk is quick
        (or the WAL reached CHECKPOINT_FORCED)."""
        scale: int = getattr(conn, "frame_scale", 1)
        frames = _wal_frames(conn)
        if frames is None:
            return
        locked = CHECKPOINT_LOCKED // scale
        if frames[0] - frames[1] < CHECKPOINT_PAGES // scale and frames[0] < locked:
            return
        quick = True
        if frames[0] - frames[1] >= CHECKPOINT_PAGES // scale:
            for _ in range(PASSES):
                start = time.monotonic()
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.passes += 1
                quick = time.monotonic() - start < SLOW
                frames = _wal_frames(conn)
                if frames is None or not quick or frames[0] - frames[1] <= TAIL // scale:
                    break
        if frames is None or frames[0] < locked:
            return
        if not quick and frames[0] < CHECKPOINT_FORCED // scale:
            self.deferred += 1
            return
        # RESTART: the tail copied with no writer appending (they wait for the writer
        # lock), then the readers still in the WAL waited for (the busy handler; reads are
        # short), so that the next write starts the WAL from its beginning: a PASSIVE pass
        # left that to a writer starting at an instant every frame was copied, and the WAL
        # grew to SQLite's backstop (bench_idem_sqlite --stores 2: 27,000 frames)
        with writer_lock(conn):
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        self.locked += 1


def _open(path: Path) -> Connection:
    """A `Connection` of the file at `path` with its writer lock file and SQLite's busy
    timeout: what the store's connection (`_connect`) and its checkpointer's share."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=Connection)
    try:
        conn.writer = open_lock_file(path)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    except BaseException:
        conn.close()
        raise
    return conn


def _frame_scale(conn: sqlite3.Connection) -> int:
    """The file's page size in 4-KiB frames: the checkpoint counts' divisor."""
    size: int = conn.execute("PRAGMA page_size").fetchone()[0]
    return max(1, size // _FRAME)


def _checkpointer_connect(path: Path) -> sqlite3.Connection:
    """The checkpointer's connection: the file's lock file and settings (synchronous=NORMAL:
    a checkpoint syncs the WAL and the file), no migrations (its SQLiteDB's connection ran
    them), a small page cache (a checkpoint copies frames without it)."""
    conn = _open(path)
    try:
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA cache_size = -1024")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # it never writes; none of its own
        # the file's journal mode read once: a connection checkpoints only once it knows
        # the file is in WAL
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        if mode != "wal":
            raise sqlite3.OperationalError(f"{path} is not in WAL mode ({mode})")
        conn.frame_scale = _frame_scale(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def chunks(seq: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def marks(n: int) -> str:
    return ",".join("?" * n)


def autocommit(c: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
    """One write statement as its own transaction, under the file's writer lock.

    Every writer of a file must take that lock: one that does not (a bare autocommit
    INSERT, as the webhook door's intake append was) meets SQLite's lock held by those that
    do and sleeps in the busy handler, up to 100 ms a time, while they take the lock again
    within 1 ms of its release; and a worker holding the writer lock that meets such a
    statement's SQLite lock sleeps there in turn."""
    with writer_lock(c):
        cur = c.execute(sql, params)
    checkpoint_if_due(c)
    return cur


def _write(c: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """One statement in its own write transaction; its rowcount."""
    n: int = autocommit(c, sql, params).rowcount
    return n


def fetchall(sql: str, params: Sequence[Any] = ()) -> Callable[[sqlite3.Connection], list[Any]]:
    """A `run` callable for a read; binds its parameters now (safe inside loops)."""
    return lambda c: c.execute(sql, params).fetchall()


def fetchone(sql: str, params: Sequence[Any] = ()) -> Callable[[sqlite3.Connection], Any]:
    return lambda c: c.execute(sql, params).fetchone()


def _wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL. A new file's switch takes an exclusive lock that SQLite does not
    wait for (no busy handler there): two workers creating state.idem.db at once failed one of
    them with "database is locked". The caller holds the writer lock, which serializes
    processes that have the lock file; the retries cover one that does not."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def open_lock_file(path: Path) -> int | None:
    """A descriptor of the file's writer lock (`<file>-lock`), None if it cannot be opened
    (SQLite's busy handler alone then orders the writers, as before the lock file)."""
    try:
        return os.open(f"{path}-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None


def _connect(
    path: Path, migrations: Sequence[Migration], page_size: int | None = None
) -> sqlite3.Connection:
    conn = _open(path)
    try:
        with writer_lock(conn):
            if page_size is not None:
                # Takes effect only on a file not yet written (the switch to WAL below writes
                # its first page); an existing file keeps its page size (SQLite ignores it).
                conn.execute(f"PRAGMA page_size = {int(page_size)}")
            _wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        # Checkpoint every 4,000 WAL pages (16 MiB; default 1,000): random-key B-trees (the
        # idempotency keys) dirty a page per key, and pages dirtied again between two
        # checkpoints are copied and synced once. Commits are as durable either way. Run by
        # `checkpoint_if_due` after the writer lock is released; SQLite's own (in COMMIT)
        # only as a backstop.
        conn.frame_scale = _frame_scale(conn)
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP // conn.frame_scale}")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA cache_size = -65536")  # 64 MiB
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        with immediate(conn):
            done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
            for m in sorted(migrations, key=lambda m: m.version):
                if m.version in done:
                    continue
                for stmt in m.statements:
                    if callable(stmt):
                        stmt(conn)
                    else:
                        conn.execute(stmt)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (m.version, m.name, time.time()),
                )
    except BaseException:
        conn.close()
        raise
    return conn


class SQLiteDB:
    """One SQLite file, one connection, one thread. Shared by every store on that file."""

    def __init__(self, path: Path, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self.path = path
        self._conn = conn
        self._executor = executor
        self._closed = False

    @classmethod
    async def open(
        cls, path: Path, migrations: Sequence[Migration] = MIGRATIONS, page_size: int | None = None
    ) -> SQLiteDB:
        """Create the parent directory and file if needed and bring the schema up to date;
        `page_size` (bytes, a power of two 512-65536) for a new file (SQLite's default
        4,096 otherwise; an existing file keeps its own)."""
        path = Path(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{path.name}")
        loop = asyncio.get_running_loop()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await loop.run_in_executor(executor, _connect, path, migrations, page_size)
        except (OSError, sqlite3.Error) as exc:
            executor.shutdown(wait=False)
            raise StoreUnavailable("sqlite", str(path), str(exc)) from exc
        checkpointer = Checkpointer(path)
        try:
            await loop.run_in_executor(executor, checkpointer.start)
        except (OSError, sqlite3.Error) as exc:
            await loop.run_in_executor(executor, conn.close)
            executor.shutdown(wait=False)
            raise StoreUnavailable("sqlite", str(path), str(exc)) from exc
        assert isinstance(conn, Connection)
        conn.checkpointer = checkpointer
        return cls(path, conn, executor)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in the DB thread. sqlite3 errors propagate unchanged."""
        if self._closed:
            raise StoreUnavailable("sqlite", str(self.path), "database is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self._conn)

    async def call(self, store: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`run` for state stores: an unusable database becomes StoreUnavailable."""
        try:
            return await self.run(fn)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(store, str(self.path), str(exc)) from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        checkpointer: Checkpointer | None = getattr(self._conn, "checkpointer", None)
        if checkpointer is not None:
            await loop.run_in_executor(self._executor, checkpointer.close)
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _epoch(dt: datetime) -> float:
    """Naive datetimes are taken as UTC, never as local time."""
    return (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp()


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


# --------------------------------------------------------------------------------- checkpoints


class SQLiteCheckpointStore:
    """Implements CheckpointStore with the same key and JSON value as the Redis one."""

    def __init__(self, db: SQLiteDB, worker: str) -> None:
        self._db = db
        self._worker = worker

    key = staticmethod(checkpoint_key)

    async def load(self, tenant: str, source: str) -> dict[str, Any] | None:
        key = self.key(tenant, source)
        row = await self._db.call(
            "checkpoint", fetchone("SELECT value FROM checkpoints WHERE key = ?", (key,))
        )
        if row is None:
            return None
        position: dict[str, Any] | None = orjson.loads(row[0]).get("position")
        return position

    async def save(self, tenant: str, source: str, position: Mapping[str, Any]) -> None:
        key = self.key(tenant, source)
        value = checkpoint_value(tenant, source, position, iso(time.time()), self._worker).decode()
        sql = "INSERT OR REPLACE INTO checkpoints (key, value) VALUES (?, ?)"
        await self._db.call("checkpoint", lambda c: _write(c, sql, (key, value)))

    async def delete(self, tenant: str, source: str) -> None:
        key = self.key(tenant, source)
        sql = "DELETE FROM checkpoints WHERE key = ?"
        await self._db.call("checkpoint", lambda c: _write(c, sql, (key,)))

    async def list(self) -> dict[str, dict[str, Any]]:
        """Every checkpoint by key, full value (position, updated_at, worker)."""
        rows = await self._db.call("checkpoint", fetchall("SELECT key, value FROM checkpoints"))
        return {k: orjson.loads(v) for k, v in rows}


# ------------------------------------------------------------------------------------- DLQ

_DLQ_COLS = (
    "id, dedupe_key, tenant, source, sink, reason, detail, payload, attempts,"
    " first_failed_at, last_failed_at, entity_type, entity_id, revision"
)
_DLQ_UPSERT = (
    "INSERT INTO dlq (dedupe_key, tenant, source, sink, reason, detail, payload, attempts,"
    " first_failed_at, last_failed_at, entity_type, entity_id, revision)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (dedupe_key, sink) DO UPDATE SET attempts = attempts + excluded.attempts,"
    " last_failed_at = excluded.last_failed_at, reason = excluded.reason,"
    " detail = excluded.detail"
)


def _where(flt: DLQFilter) -> tuple[str, list[Any]]:
    """SQL condition for a DLQFilter ("1" when it selects everything)."""
    clauses: list[str] = []
    params: list[Any] = []

    def among(column: str, values: Sequence[Any]) -> None:
        clauses.append(f"{column} IN ({marks(len(values))})")
        params.extend(values)

    if flt.tenant is not None:
        clauses.append("tenant = ?")
        params.append(flt.tenant)
    if flt.reasons:
        among("reason", [ReasonCode(r).value for r in flt.reasons])
    if flt.sources:
        among("source", list(flt.sources))
    if flt.sinks:
        among("sink", ["" if s == "-" else s for s in flt.sinks])
    if flt.since is not None:
        clauses.append("last_failed_at >= ?")
        params.append(_epoch(flt.since))
    if flt.until is not None:
        clauses.append("last_failed_at < ?")
        params.append(_epoch(flt.until))
    if flt.older_than is not None:
        clauses.append("first_failed_at < ?")
        params.append(_epoch(flt.older_than))
    if flt.ids:
        among("id", list(flt.ids))
    return (" AND ".join(clauses) or "1"), params


def _entry(row: tuple[Any, ...]) -> DLQEntry:
    (
        id_,
        key,
        tenant,
        source,
        sink,
        reason,
        detail,
        payload,
        attempts,
        first,
        last,
        et,
        ei,
        rev,
    ) = row
    return DLQEntry(
        dedupe_key=key,
        tenant=tenant,
        source=source,
        sink=sink or None,
        reason=ReasonCode(reason),
        detail=orjson.loads(detail),
        payload=payload,
        attempts=attempts,
        first_failed_at=_utc(first),
        last_failed_at=_utc(last),
        entity_type=et,
        entity_id=ei,
        revision=rev,
        id=id_,
    )


class SQLiteDLQStore:
    """Implements DLQStore. A NULL sink (failed before routing) is stored as '' so that the
    UNIQUE (dedupe_key, sink) upsert also holds for it; it reads back as None."""

    def __init__(self, db: SQLiteDB, clock: Clock = time.time) -> None:
        self._db = db
        self._clock = clock

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._db.call("dlq", fn)

    async def add(self, entries: Sequence[DLQEntry]) -> None:
        if not entries:
            return
        rows = [
            (
                e.dedupe_key,
                e.tenant,
                e.source,
                e.sink or "",
                ReasonCode(e.reason).value,
                _json(e.detail),
                e.payload,
                e.attempts,
                _epoch(e.first_failed_at),
                _epoch(e.last_failed_at),
                e.entity_type,
                e.entity_id,
                e.revision,
            )
            for e in entries
        ]

        def write(c: sqlite3.Connection) -> None:
            with immediate(c):
                c.executemany(_DLQ_UPSERT, rows)

        await self._call(write)

    async def record_processed(self, counts: Mapping[tuple[str, str], int]) -> None:
        rows = [(t, s, n) for (t, s), n in counts.items() if n]
        if not rows:
            return
        sql = (
            "INSERT INTO processed_counts VALUES (?, ?, ?)"
            " ON CONFLICT (tenant, source) DO UPDATE SET count = count + excluded.count"
        )

        def write(c: sqlite3.Connection) -> None:
            with immediate(c):
                c.executemany(sql, rows)

        await self._call(write)

    async def processed_total(self, tenant: str | None) -> int:
        sql = "SELECT COALESCE(SUM(count), 0) FROM processed_counts"
        if tenant is None:
            row = await self._call(fetchone(sql))
        else:
            row = await self._call(fetchone(sql + " WHERE tenant = ?", (tenant,)))
        return int(row[0])

    async def count(self, flt: DLQFilter) -> int:
        where, params = _where(flt)
        row = await self._call(fetchone(f"SELECT count(*) FROM dlq WHERE {where}", params))
        return int(row[0])

    async def count_records(self, flt: DLQFilter) -> int:
        where, params = _where(flt)
        sql = f"SELECT count(DISTINCT dedupe_key) FROM dlq WHERE {where}"
        row = await self._call(fetchone(sql, params))
        return int(row[0])

    async def groups(self, flt: DLQFilter) -> list[DLQGroup]:
        where, params = _where(flt)
        sql = (
            "SELECT reason, sink, source, count(*), min(last_failed_at), max(last_failed_at),"
            f" sum(attempts) FROM dlq WHERE {where} GROUP BY reason, sink, source"
            " ORDER BY count(*) DESC, reason, sink, source"
        )
        rows = await self._call(fetchall(sql, params))
        return [
            DLQGroup(
                reason=ReasonCode(r),
                sink=sink or None,
                source=src,
                count=n,
                oldest=_utc(lo),
                newest=_utc(hi),
                extra={"attempts": att},
            )
            for r, sink, src, n, lo, hi, att in rows
        ]

    async def scan(self, flt: DLQFilter, batch_size: int = 500) -> AsyncIterator[list[DLQEntry]]:
        """Keyset paging on id: deleting or updating entries between pages skips nothing."""
        where, params = _where(flt)
        sql = f"SELECT {_DLQ_COLS} FROM dlq WHERE {where} AND id > ? ORDER BY id LIMIT ?"
        last = 0
        while True:
            rows = await self._call(fetchall(sql, (*params, last, batch_size)))
            if not rows:
                return
            last = rows[-1][0]
            yield [_entry(r) for r in rows]
            if len(rows) < batch_size:
                return

    async def delete(self, ids: Sequence[int]) -> int:
        ids = list(ids)

        def write(c: sqlite3.Connection) -> int:
            n = 0
            with immediate(c):
                for part in chunks(ids):
                    n += c.execute(
                        f"DELETE FROM dlq WHERE id IN ({marks(len(part))})", part
                    ).rowcount
            return n

        return await self._call(write) if ids else 0

    async def fail_again(
        self, entry_id: int, reason: ReasonCode, detail: Mapping[str, Any], attempts: int
    ) -> None:
        sql = (
            "UPDATE dlq SET attempts = attempts + ?, reason = ?, detail = ?, last_failed_at = ?"
            " WHERE id = ?"
        )
        params = (attempts, ReasonCode(reason).value, _json(dict(detail)), self._clock(), entry_id)
        await self._call(lambda c: _write(c, sql, params))

    async def health(self) -> dict[str, Any]:
        row = await self._call(fetchone("SELECT count(*) FROM dlq"))
        return {"backend": "sqlite", "path": str(self._db.path), "ok": True, "entries": row[0]}

    async def close(self) -> None:
        """No-op: the SQLiteDB is shared by several stores; whoever opened it closes it."""


# ------------------------------------------------------------------------------------ drops


class SQLiteDroppedStore:
    """Records brownout dropped, kept (payload included) so a later replay can bring them back."""

    def __init__(self, db: SQLiteDB) -> None:
        self._db = db

    async def add(self, records: Sequence[DroppedRow]) -> None:
        """(dedupe key, tenant, source, payload, dropped_at); a key already kept is ignored."""
        if not records:
            return
        rows = [(k, t, s, p, at) for k, t, s, p, at in records]
        sql = (
            "INSERT OR IGNORE INTO dropped (key, tenant, source, payload, dropped_at)"
            " VALUES (?, ?, ?, ?, ?)"
        )

        def write(c: sqlite3.Connection) -> None:
            with immediate(c):
                c.executemany(sql, rows)

        await self._db.call("dropped", write)

    async def count(self, tenant: str | None = None) -> int:
        if tenant is None:
            read = fetchone("SELECT count(*) FROM dropped")
        else:
            read = fetchone("SELECT count(*) FROM dropped WHERE tenant = ?", (tenant,))
        row = await self._db.call("dropped", read)
        return int(row[0])

    async def scan(
        self, tenant: str | None = None, batch_size: int = 500
    ) -> AsyncIterator[list[DroppedRow]]:
        """Pages in drop order; safe to delete what was read between pages."""
        cond = "tenant = ? AND " if tenant is not None else ""
        sql = (
            f"SELECT id, key, tenant, source, payload, dropped_at FROM dropped"
            f" WHERE {cond}id > ? ORDER BY id LIMIT ?"
        )
        head: tuple[Any, ...] = (tenant,) if tenant is not None else ()
        last = 0
        while True:
            rows = await self._db.call("dropped", fetchall(sql, (*head, last, batch_size)))
            if not rows:
                return
            last = rows[-1][0]
            yield [(k, t, s, p, at) for _, k, t, s, p, at in rows]
            if len(rows) < batch_size:
                return

    async def delete(self, keys: Sequence[bytes]) -> int:
        keys = list(keys)

        def write(c: sqlite3.Connection) -> int:
            n = 0
            with immediate(c):
                for part in chunks(keys):
                    sql = f"DELETE FROM dropped WHERE key IN ({marks(len(part))})"
                    n += c.execute(sql, part).rowcount
            return n

        return await self._db.call("dropped", write) if keys else 0
