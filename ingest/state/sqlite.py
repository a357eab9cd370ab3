"""Embedded state on SQLite: checkpoints, DLQ, processed counts, drops in the state file
(`state.db`); idempotency keys in a file of their own beside it (`state.idem.db`,
`open_idempotency_db`).

`SQLiteDB` owns exactly one connection, used only from one dedicated thread, so the event loop
never blocks and there is no cross-thread locking; every store built on the same file shares
it. WAL with synchronous=NORMAL survives a process crash (kill -9) at every commit; only an OS
crash can lose the last transactions.

Several processes write one file (a pod's workers, the control plane's webhook intake, the
CLIs). Every write transaction (`immediate`) first takes the file's writer lock, an `flock`
on `<file>-lock`, and only then SQLite's own write lock, which is then free at once. A writer
that finds SQLite's lock held waits in SQLite's busy handler, which sleeps 1, 2, 5 ... 100 ms
at a time whatever the holder does: two workers writing one file lost a third of their time
asleep there (docs/benchmarks.md). The writer lock is asked for again within 50 µs - 1 ms of
its release instead. It only orders the writers; exclusion and durability are SQLite's, as
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
import fcntl
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson

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

CHUNK = 900  # bound parameters per IN (...) list; below SQLite's historical 999 limit


class Migration(NamedTuple):
    """A schema step: SQL statements, or functions of the connection for steps SQL alone
    cannot say (tables named by data); all of one migration run in one transaction."""

    version: int
    name: str
    statements: tuple[str | Callable[[sqlite3.Connection], None], ...]


# ------------------------------------------------------------- idempotency keys, one table a day

DAY = 86_400
IDEM_PREFIX = "idem_"
# The layout of every day's table (migration 12); `idem_YYYYMMDD` holds the claims made that
# UTC day. One B-tree per claim (no expiry index): a day's keys all expire together, with
# DROP TABLE, as the Redis store's hashes expire by day.
_IDEM_DAY_DDL = (
    "CREATE TABLE IF NOT EXISTS {} (key BLOB PRIMARY KEY, claimed_at REAL NOT NULL) WITHOUT ROWID"
)
# Claims land here first (migration 13) and move to their days' tables in one sorted merge
# once RECENT_KEYS were claimed. A batch of random 32-byte keys dirties about one page per
# key of a day's big B-tree, and each claim's commit writes every page it dirtied to the WAL;
# into this small tree the same batch dirties a few hundred pages, and the merge writes each
# page of the day's table about once per RECENT_KEYS keys. Measured on 32-byte keys in
# 2,000-key claims (CPU per key): 200k keys 7.5-10.4 -> 5.1-6.2 µs, 1M keys 16.5 -> 8.3 µs.
# The merge goes by key range, one of MERGE_SLICES per claim (a claim waits for a 32nd of a
# merge, not all of it; each page of the target is still written once per merge).
# Once the day's table outgrew RECENT_KEYS pages (~3M keys: ~60 keys a page) that merge
# dirtied about a page per key again (state thread 10 -> 23 µs/key from 250k to 2M keys), so
# a middle level (migration 14) sits between: the recent claims merge into `idem_mid`, which
# merges into the days' tables once MID_KEYS were moved into it, in MID_SLICES key ranges, one
# per claim. Pages written per key: ~(MID_KEYS / 2 / 60) / RECENT_KEYS into the middle level
# plus (the day's keys / 60) / MID_KEYS into the day's (bench/bench_idem_sqlite.py).
IDEM_RECENT = "idem_recent"
IDEM_MID = "idem_mid"
RECENT_KEYS = 50_000
# Slices sized so that a merge lasts about as many claims as its level takes to fill at a
# steady rate (2,000-key claims: 50k keys ~ 25 claims, 500k ~ 250): the moves are spread over
# the claims instead of bunched. With 8 and 64 the steady bench's state thread went from
# ~25 to 42-47 us a record for ~10 s about every 40 s, and the backlog from 2k to 46k records
# (p95 lag 3.2 s, 2026-12-01 21:27). A merge still due when the next one is (a faster rate)
# simply goes on: one slice per claim, each a fixed share of a level that grew meanwhile.
MERGE_SLICES = 32
MID_KEYS = 500_000
MID_SLICES = 256
# `seen` asks an in-memory filter first and SQLite only for the keys the filter may hold
# (SQLiteIdempotencyStore); the filter learns every process's claims from this log, whose
# rows are kept LOG_KEEP seconds (a process that fell further behind rebuilds its filter).
IDEM_LOG = "idem_log"
LOG_KEEP = 300.0


class _Bloom:
    """A Bloom filter of up to BLOOM_KEYS 32-byte digests, two bits a key (~1.4 % false
    positives when full), and the newest claim time of its keys (it is dropped once that
    expired). The keys are SHA-256 digests: their bytes are the hash."""

    __slots__ = ("bits", "n", "newest")
    BITS = 1 << 26  # 8 MiB
    KEYS = 1 << 22  # 16 bits a key

    def __init__(self) -> None:
        self.bits = bytearray(self.BITS >> 3)
        self.n = 0
        self.newest = float("-inf")


def _words(blob: bytes) -> tuple[list[int], list[int]]:
    """Two 26-bit positions per 32-byte key of `blob` (its first two 32-bit words)."""
    words = memoryview(blob).cast("I")
    return [w >> 6 for w in words[0::8].tolist()], [w >> 6 for w in words[1::8].tolist()]


def _load_bloom() -> tuple[
    Callable[[bytearray, bytes], None] | None, Callable[[bytearray, bytes], list[int]] | None
]:
    """`add` and `maybe` of one filter compiled (`ingest_native`, the same bits as the Python
    loops below, ~50x faster: every process adds every key claimed in the file, its own and
    the other workers', on a thread that holds the GIL beside the event loop); None, None
    when the extension is missing or older than these functions."""
    if os.environ.get("INGEST_NO_EXTENSION"):
        return None, None
    try:
        import ingest_native  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None, None
    add = getattr(ingest_native, "bloom_add", None)
    maybe = getattr(ingest_native, "bloom_maybe", None)
    return (add, maybe) if add is not None and maybe is not None else (None, None)


_BLOOM_ADD, _BLOOM_MAYBE = _load_bloom()


class KeyFilter:
    """The claimed keys as a chain of Bloom filters: `maybe` never answers False for a key
    added (and not yet dropped as expired); True may be wrong and is checked in SQLite."""

    def __init__(self) -> None:
        self._blooms: list[_Bloom] = []

    def __len__(self) -> int:
        return sum(b.n for b in self._blooms)

    def add(self, blob: bytes, claimed_at: float) -> None:
        n = len(blob) // 32
        if not self._blooms or self._blooms[-1].n + n > _Bloom.KEYS:
            self._blooms.append(_Bloom())
        bloom = self._blooms[-1]
        bits = bloom.bits
        if _BLOOM_ADD is not None:
            _BLOOM_ADD(bits, blob)
        else:
            ps, qs = _words(blob)
            for p, q in zip(ps, qs, strict=True):
                bits[p >> 3] |= 1 << (p & 7)
                bits[q >> 3] |= 1 << (q & 7)
        bloom.n += n
        bloom.newest = max(bloom.newest, claimed_at)

    def maybe(self, blob: bytes) -> list[int]:
        """Indexes of the keys of `blob` that may have been added."""
        if _BLOOM_MAYBE is not None:
            if len(self._blooms) == 1:
                return _BLOOM_MAYBE(self._blooms[0].bits, blob)
            hits: set[int] = set()
            for bloom in self._blooms:
                hits.update(_BLOOM_MAYBE(bloom.bits, blob))
            return sorted(hits)
        ps, qs = _words(blob)
        found: set[int] = set()
        for bloom in self._blooms:
            bits = bloom.bits
            found.update(
                i
                for i, (p, q) in enumerate(zip(ps, qs, strict=True))
                if bits[p >> 3] >> (p & 7) & 1 and bits[q >> 3] >> (q & 7) & 1
            )
        return sorted(found)

    def expire(self, before: float) -> None:
        """Drop the filters whose newest key was claimed at or before `before`."""
        self._blooms = [b for b in self._blooms if b.newest > before]


def key_range(part: int, slices: int) -> tuple[str, tuple[bytes, ...]]:
    """The SQL condition (and its parameters) for key range `part` of `slices` equal ranges
    of the key space (by the keys' first two bytes; the last range is open above)."""
    lo = (part * 65536 // slices).to_bytes(2, "big")
    if part + 1 < slices:
        return " AND key >= ? AND key < ?", (lo, ((part + 1) * 65536 // slices).to_bytes(2, "big"))
    return " AND key >= ?", (lo,)


def idem_table(day: int) -> str:
    """`idem_20261201` for day number `day` (days since 1970-01-01 UTC)."""
    return IDEM_PREFIX + datetime.fromtimestamp(day * DAY, UTC).strftime("%Y%m%d")


def idem_day(table: str) -> int | None:
    """The day number a table name stands for, None if it is not a day table."""
    digits = table.removeprefix(IDEM_PREFIX)
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return int(datetime.strptime(digits, "%Y%m%d").replace(tzinfo=UTC).timestamp()) // DAY
    except ValueError:
        return None


def idem_days(c: sqlite3.Connection) -> dict[int, str]:
    """The day tables in the file (every process's claims), day number -> name."""
    return idem_days_in(c, "main")


def idem_days_in(c: sqlite3.Connection, schema: str) -> dict[int, str]:
    """`idem_days` of an attached database `schema`."""
    (names,) = c.execute(
        f"SELECT group_concat(name, ' ') FROM {schema}.sqlite_master WHERE type = 'table'"
        f" AND name GLOB '{IDEM_PREFIX}[0-9]*'"
    ).fetchone()
    days = ((idem_day(n), n) for n in (names or "").split())
    return {d: n for d, n in days if d is not None}


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
)


BUSY_TIMEOUT = 5.0  # seconds a writer waits for the writer lock, then as long for SQLite's
_POLL_FIRST, _POLL_MAX = 50e-6, 1e-3  # the writer lock is asked for again this often


class Connection(sqlite3.Connection):
    """A connection with its file's writer lock: an open descriptor of `<file>-lock`, or
    None (the lock file could not be opened: SQLite's busy handler alone orders writers)."""

    writer: int | None = None
    writer_timeout: float = BUSY_TIMEOUT
    shm: int | None = None  # `<file>-shm`, read for the WAL's size (`checkpoint_if_due`)

    def close(self) -> None:
        super().close()
        for name in ("writer", "shm"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)


def _flock(fd: int, timeout: float) -> bool:
    """`flock(LOCK_EX)` on `fd` within `timeout` seconds (False: not taken). Asked again
    every 50 µs at first, then every 1 ms at most; flock itself has no timeout."""
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
CHECKPOINT_PAGES = 4000  # frames not yet copied back (16 MiB): time for a checkpoint
CHECKPOINT_LOCKED = 12000  # frames in the WAL (48 MiB): the checkpoint under the writer lock
WAL_BACKSTOP = 16000  # SQLite's autocheckpoint (64 MiB)


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
    """After a write transaction, outside the writer lock: a passive checkpoint once
    CHECKPOINT_PAGES frames wait to be copied back, under the writer lock once the WAL holds
    CHECKPOINT_LOCKED (see above)."""
    if conn.in_transaction:
        return
    frames = _wal_frames(conn)
    if frames is None or frames[0] - frames[1] < CHECKPOINT_PAGES:
        return
    if frames[0] >= CHECKPOINT_LOCKED:
        with writer_lock(conn):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    else:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


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


def _connect(path: Path, migrations: Sequence[Migration]) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=Connection)
    try:
        try:
            conn.writer = os.open(f"{path}-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            conn.writer = None  # SQLite's busy handler alone, as before the lock file
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        with writer_lock(conn):
            _wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        # Checkpoint every 4,000 WAL pages (16 MiB; default 1,000): random-key B-trees (the
        # idempotency keys) dirty a page per key, and pages dirtied again between two
        # checkpoints are copied and synced once. Commits are as durable either way. Run by
        # `checkpoint_if_due` after the writer lock is released; SQLite's own (in COMMIT)
        # only as a backstop.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP}")
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
    async def open(cls, path: Path, migrations: Sequence[Migration] = MIGRATIONS) -> SQLiteDB:
        """Create the parent directory and file if needed and bring the schema up to date."""
        path = Path(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{path.name}")
        loop = asyncio.get_running_loop()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await loop.run_in_executor(executor, _connect, path, migrations)
        except (OSError, sqlite3.Error) as exc:
            executor.shutdown(wait=False)
            raise StoreUnavailable("sqlite", str(path), str(exc)) from exc
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
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)


# ------------------------------------------------------- the idempotency keys' own file

# The idempotency store's tables (migrations 13-15, the day tables made as days come) live in
# a file of their own beside the state file, `state.idem.db` beside `state.db`, with its own
# connection, thread and writer lock: a claim holds its file's write lock for its whole
# transaction (~2,000 random keys into `idem_recent`, ~15 ms), and in one file the other
# workers' checkpoint, lease and processed-count writes (~0.1 ms each, on the way to every
# batch's commit) queued behind it; and every commit of those (and of the webhook intake) in
# the same file threw away the store connection's page cache.
IDEM_MIGRATIONS: tuple[Migration, ...] = tuple(m for m in MIGRATIONS if m.version in (13, 14, 15))


def idem_path(state: Path) -> Path:
    """The idempotency keys' file for state file `state`: `state.idem.db` for `state.db`."""
    state = Path(state)
    return state.with_name(f"{state.stem}.idem{state.suffix}")


def _state_keys(c: sqlite3.Connection) -> bool:
    """Whether the state file still holds idempotency keys (claimed before the keys had a
    file of their own)."""
    return bool(idem_days(c)) or any(
        c.execute(f"SELECT EXISTS (SELECT 1 FROM {t})").fetchone()[0]
        for t in (IDEM_RECENT, IDEM_MID)
    )


def _copy_state_keys(state: Path) -> Callable[[sqlite3.Connection], None]:
    """A `run` callable on the idempotency file: copy every key of the state file's levels
    into the same level here (a key already here keeps its own claim), in one transaction."""

    def copy(c: sqlite3.Connection) -> None:
        c.execute("ATTACH DATABASE ? AS state", (str(state),))
        try:
            with immediate(c):
                for table in (IDEM_RECENT, IDEM_MID, *idem_days_in(c, "state").values()):
                    c.execute(_IDEM_DAY_DDL.format(f"main.{table}"))
                    c.execute(f"INSERT OR IGNORE INTO main.{table} SELECT * FROM state.{table}")
        finally:
            c.execute("DETACH DATABASE state")

    return copy


def _drop_state_keys(c: sqlite3.Connection) -> None:
    """On the state file, once its keys were copied: empty the levels, drop the day tables
    and the log (nothing claims there any more)."""
    with immediate(c):
        for table in (IDEM_RECENT, IDEM_MID, IDEM_LOG):
            c.execute(f"DELETE FROM {table}")
        for table in idem_days(c).values():
            c.execute(f"DROP TABLE {table}")


async def open_idempotency_db(state: SQLiteDB) -> SQLiteDB:
    """The idempotency keys' file beside the state file (made if missing), with the keys a
    state file of older code holds moved into it first: copied in one transaction, then
    deleted from the state file in another, so a key is in one file or both at every
    instant; a process killed in between copies again (a key copied twice stays one key)
    and deletes. Every process of a state file does this before its store answers, so none
    misses a key the state file held. Stop every process of the old code first, as for
    any migration."""
    idem = await SQLiteDB.open(idem_path(state.path), IDEM_MIGRATIONS)
    try:
        if await state.call("idempotency", _state_keys):
            await idem.call("idempotency", _copy_state_keys(state.path))
            await state.call("idempotency", _drop_state_keys)
    except BaseException:
        await idem.close()
        raise
    return idem


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


# --------------------------------------------------------------------------------- idempotency


# The batch's keys travel as one blob of 32-byte digests, cut in SQL: one statement per batch,
# which SQLite runs without taking the GIL back per key as executemany does (in the service,
# beside the event loop's thread: 5.2 instead of 6.6 µs of CPU per claimed key).
_KEYS = (
    "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 32 FROM k WHERE i + 32 <= length(?1))"
)


def _key_blob(keys: Sequence[bytes]) -> bytes:
    if any(len(k) != 32 for k in keys):
        raise ValueError("idempotency keys are 32-byte digests")
    return b"".join(keys)


class SQLiteIdempotencyStore:
    """Implements IdempotencyStore: 32-byte keys as BLOBs with their claim time, in three
    levels, each merged into the next in sorted key ranges (an LSM of two small levels over
    the days' tables). A claim goes to `idem_recent` (migration 13); every `recent_keys`
    claimed keys the store moves them, in `recent_slices` key ranges (one per claim, one
    transaction each), into `idem_mid` (migration 14); every `mid_keys` keys moved there it
    moves those, in `mid_slices` ranges, into the table of their UTC claim day
    (`idem_YYYYMMDD`, migration 12). A move inserts and deletes in one transaction, so a key
    is in at least one level at every commit; seen() probes them all (recent, mid, each live
    day) for the keys its in-memory filter (`KeyFilter`) may hold, and ignores keys older than
    the TTL at once; a day's table is dropped by the first claim after every key in it expired
    (end of that day + TTL), and a merge carries only unexpired keys on, so the file holds at
    most TTL + 1 day of keys (and, per process, up to `recent_keys` + `mid_keys` not yet
    merged, expired ones included).

    The filter holds every key claimed in the file by any process: built from the levels at
    the first seen(), then kept up from `idem_log` (migration 15), one row per claim written
    in the claim's transaction, read on from the last row read before each answer. A Bloom
    filter never answers "no" for a key it holds, so a key it rules out was never claimed
    (or its claim expired); the rest are looked up exactly. Log rows older than LOG_KEEP are
    pruned at the start of each `idem_recent` merge; a process that finds rows it did not
    read pruned builds its filter again."""

    def __init__(
        self,
        db: SQLiteDB,
        ttl_seconds: int = 7 * 86400,
        clock: Clock = time.time,
        recent_keys: int = RECENT_KEYS,
        mid_keys: int = MID_KEYS,
        mid_slices: int = MID_SLICES,
        recent_slices: int = MERGE_SLICES,
    ) -> None:
        self._db = db
        self._ttl = ttl_seconds
        self._clock = clock
        self._recent_keys = recent_keys
        self._mid_keys = mid_keys
        self._mid_slices = mid_slices
        self._recent_slices = recent_slices
        # Read and written only in the DB thread: the day table known to exist, when the
        # oldest table in the file expires whole, the keys this store claimed into
        # `idem_recent` / moved into `idem_mid` since that level's last merge (None: not
        # counted yet, e.g. after a restart), and the key range each merge in progress
        # moves next (None: no merge in progress).
        self._today: str | None = None
        self._next_drop = 0.0
        self._recent: int | None = None
        self._slice: int | None = None
        self._mid: int | None = None
        self._mid_slice: int | None = None
        # The keys claimed in the file, as far as this process knows (built at its first
        # seen(), then kept up from `idem_log`), and the last log row it read (None: not
        # built). Both read and written only in the DB thread.
        self._filter = KeyFilter()
        self._logged: int | None = None

    def _live(self, days: Mapping[int, str], now: float) -> list[str]:
        """Tables that may hold unexpired keys, newest first."""
        return [days[d] for d in sorted(days, reverse=True) if (d + 1) * DAY + self._ttl > now]

    async def seen(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        blob = _key_blob(keys)
        now = self._clock()
        since = now - self._ttl

        def query(c: sqlite3.Connection) -> list[int]:
            self._catch_up(c, now)
            maybe = self._filter.maybe(blob)
            if not maybe:
                return []
            # only the keys the filter may hold are looked up, in every level
            few = b"".join(blob[i * 32 : i * 32 + 32] for i in maybe)
            tables = [IDEM_RECENT, IDEM_MID, *self._live(idem_days(c), now)]
            probe = " OR ".join(
                f"EXISTS (SELECT 1 FROM {t} WHERE key = substr(?1, i, 32) AND claimed_at > ?2)"
                for t in tables
            )
            sql = f"{_KEYS} SELECT group_concat(i) FROM k WHERE {probe}"
            hits: str | None = c.execute(sql, (few, since)).fetchone()[0]
            return [maybe[(int(i) - 1) // 32] for i in hits.split(",")] if hits else []

        hits = await self._db.call("idempotency", lambda c: _again_if_dropped(c, query))
        found = [False] * len(keys)
        for i in hits:
            found[i] = True
        return found

    def _catch_up(self, c: sqlite3.Connection, now: float) -> None:
        """In the DB thread, before the filter answers: add the keys claimed (by any process)
        since it last looked, from `idem_log`; build it from the levels if it has none yet or
        if rows it has not read were pruned. One read transaction, so the log's rows and its
        pruned mark (or the levels and the log's last id) are of one instant."""
        c.execute("BEGIN")
        try:
            (through,) = c.execute(f"SELECT through FROM {IDEM_LOG}_pruned").fetchone()
            if self._logged is None or through > self._logged:
                self._build(c, now)
            else:
                for id_, claimed_at, keys in c.execute(
                    f"SELECT id, claimed_at, keys FROM {IDEM_LOG} WHERE id > ? ORDER BY id",
                    (self._logged,),
                ):
                    self._filter.add(keys, claimed_at)
                    self._logged = id_
        finally:
            c.execute("COMMIT")
        # its keys all expired (an hour's margin for a clock set back)
        self._filter.expire(now - self._ttl - 3600)

    def _build(self, c: sqlite3.Connection, now: float) -> None:
        """Inside a read transaction: the filter from every unexpired key in the levels,
        and the log's last id (every later claim is in a later row). Kept only if whole."""
        self._logged = None
        built = KeyFilter()
        (logged,) = c.execute(f"SELECT COALESCE(max(id), 0) FROM {IDEM_LOG}").fetchone()
        since = now - self._ttl
        for table in [IDEM_RECENT, IDEM_MID, *self._live(idem_days(c), now)]:
            cur = c.execute(f"SELECT key, claimed_at FROM {table} WHERE claimed_at > ?", (since,))
            while rows := cur.fetchmany(65536):
                # (seen() takes 32-byte keys only: no other could match)
                keys = b"".join(k for k, _ in rows if len(k) == 32)
                built.add(keys, max(t for _, t in rows))
        self._filter, self._logged = built, logged

    async def claim(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        blob = _key_blob(keys)
        now = self._clock()
        table = idem_table(int(now // DAY))

        def write(c: sqlite3.Connection) -> None:
            with immediate(c):
                c.execute(
                    f"{_KEYS} INSERT OR REPLACE INTO {IDEM_RECENT} (key, claimed_at)"
                    " SELECT substr(?1, i, 32), ?2 FROM k",
                    (blob, now),
                )
                c.execute(f"INSERT INTO {IDEM_LOG} (claimed_at, keys) VALUES (?, ?)", (now, blob))
            if self._recent is None:
                (self._recent,) = c.execute(f"SELECT count(*) FROM {IDEM_RECENT}").fetchone()
            else:
                self._recent += len(keys)
            if self._mid is None:
                (self._mid,) = c.execute(f"SELECT count(*) FROM {IDEM_MID}").fetchone()
            if table != self._today or now >= self._next_drop:
                self._rotate(c, table, now)
            elif self._slice is not None or self._recent >= self._recent_keys:
                if self._slice is None:
                    self._prune(c, now)
                self._merge(c, now)
            if self._mid_slice is not None or self._mid >= self._mid_keys:
                self._merge_mid(c, now)

        def again(c: sqlite3.Connection) -> None:
            try:
                write(c)
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):
                    raise
                self._today = None  # another process dropped it: the clocks disagree; recreate
                write(c)

        await self._db.call("idempotency", again)

    def _prune(self, c: sqlite3.Connection, now: float) -> None:
        """Delete the log's rows older than LOG_KEEP (by id: rows are in claim order per
        process) and say through which id, in one transaction."""
        with immediate(c):
            (last,) = c.execute(
                f"SELECT max(id) FROM {IDEM_LOG} WHERE claimed_at < ?", (now - LOG_KEEP,)
            ).fetchone()
            if last is not None:
                c.execute(f"DELETE FROM {IDEM_LOG} WHERE id <= ?", (last,))
                c.execute(f"UPDATE {IDEM_LOG}_pruned SET through = max(through, ?)", (last,))

    def _rotate(self, c: sqlite3.Connection, table: str, now: float) -> None:
        """Make today's table; merge the recent claims (all of them, into `idem_mid`); drop
        the day tables whose keys have all expired."""
        with immediate(c):
            c.execute(_IDEM_DAY_DDL.format(table))
            self._merge_in(c, now)
            days = idem_days(c)
            live = set(self._live(days, now))
            for name in days.values():
                if name not in live:
                    c.execute(f"DROP TABLE {name}")
        kept = [d for d, name in days.items() if name in live]
        self._today = table
        self._next_drop = min((d + 1) * DAY + self._ttl for d in kept)

    def _merge(self, c: sqlite3.Connection, now: float) -> None:
        """Move the next key range of `idem_recent` into `idem_mid` (a merge starts when
        `recent_keys` were claimed since the last one; keys claimed meanwhile count towards
        the next)."""
        if self._slice is None:
            self._slice, self._recent = 0, 0
        part = self._slice
        self._slice = part + 1 if part + 1 < self._recent_slices else None
        with immediate(c):
            self._merge_in(c, now, part)

    def _merge_in(self, c: sqlite3.Connection, now: float, part: int | None = None) -> None:
        """Inside a write transaction: move the unexpired keys of `idem_recent` (all, or
        those of key range `part` of `recent_slices`) to `idem_mid`, sorted, and delete them
        there (expired keys just go)."""
        where, bounds = key_range(part, self._recent_slices) if part is not None else ("", ())
        if part is None:
            self._slice, self._recent = None, 0
        moved = c.execute(
            f"INSERT OR REPLACE INTO {IDEM_MID} SELECT key, claimed_at FROM {IDEM_RECENT}"
            f" WHERE claimed_at > ?{where} ORDER BY key",
            (now - self._ttl, *bounds),
        ).rowcount
        c.execute(f"DELETE FROM {IDEM_RECENT} WHERE 1{where}", bounds)
        self._mid = (self._mid or 0) + moved

    def _merge_mid(self, c: sqlite3.Connection, now: float) -> None:
        """Move the next key range of `idem_mid` (of `mid_slices`) to the tables of their
        claim days (made if missing), sorted (each page of a day's B-tree written about once
        per merge), and delete them there (expired keys just go). A merge starts when
        `mid_keys` were moved into `idem_mid` since the last one."""
        if self._mid_slice is None:
            self._mid_slice, self._mid = 0, 0
        part = self._mid_slice
        self._mid_slice = part + 1 if part + 1 < self._mid_slices else None
        where, bounds = key_range(part, self._mid_slices)
        since = now - self._ttl
        with immediate(c):
            days = [
                day
                for (day,) in c.execute(
                    f"SELECT DISTINCT CAST(claimed_at / {DAY} AS INTEGER) FROM {IDEM_MID}"
                    f" WHERE claimed_at > ?{where}",
                    (since, *bounds),
                ).fetchall()
            ]
            for day in days:
                c.execute(_IDEM_DAY_DDL.format(idem_table(day)))
                c.execute(
                    f"INSERT OR REPLACE INTO {idem_table(day)} SELECT key, claimed_at"
                    f" FROM {IDEM_MID} WHERE claimed_at > ? AND claimed_at >= ?"
                    f" AND claimed_at < ?{where} ORDER BY key",
                    (since, day * DAY, (day + 1) * DAY, *bounds),
                )
            c.execute(f"DELETE FROM {IDEM_MID} WHERE 1{where}", bounds)
        for day in days:  # a day's table made now: its expiry
            self._next_drop = min(self._next_drop, (day + 1) * DAY + self._ttl)

    async def stats(self) -> dict[str, Any]:
        now = self._clock()

        def query(c: sqlite3.Connection) -> tuple[int, float | None]:
            n, oldest = 0, None
            for table in [*self._live(idem_days(c), now), IDEM_RECENT, IDEM_MID]:
                count, first = c.execute(
                    f"SELECT count(*), min(claimed_at) FROM {table} WHERE claimed_at > ?",
                    (now - self._ttl,),
                ).fetchone()
                n += count
                if first is not None and (oldest is None or first < oldest):
                    oldest = first
            return n, oldest

        n, oldest = await self._db.call("idempotency", lambda c: _again_if_dropped(c, query))
        return {
            "backend": "sqlite",
            "keys": n,
            "memory_bytes": None,
            "oldest_bucket": _utc(oldest).date().isoformat() if oldest is not None else None,
        }


def _again_if_dropped(c: sqlite3.Connection, read: Callable[[sqlite3.Connection], T]) -> T:
    """A read naming the day tables listed a moment before: if another process dropped one
    in between (it expired), list them again."""
    try:
        return read(c)
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return read(c)


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
