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
import functools
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


# ------------------------------------------------------------- idempotency keys, in runs a day

DAY = 86_400
IDEM_PREFIX = "idem_"
# The layout of every table of keys: `idem_mid` (migration 14), the runs `idem_YYYYMMDD_N` and
# the day tables `idem_YYYYMMDD` of older code (migration 12). One B-tree per table (no expiry
# index): a table's keys all expire together, with DROP TABLE, once its newest key expired.
_IDEM_DAY_DDL = (
    "CREATE TABLE IF NOT EXISTS {} (key BLOB PRIMARY KEY, claimed_at REAL NOT NULL) WITHOUT ROWID"
)
# A claim appends its keys to `idem_log` as one row (migration 15), in its own transaction:
# ~0.2 µs a key, where inserting them into a B-tree of random keys and committing the pages it
# dirtied cost ~4.5. Once RECENT_KEYS keys wait in the log, a claim moves them all into
# `idem_mid`, sorted, in one transaction that also says through which log row they are merged
# (`idem_log_merged`, migration 16); once MID_KEYS were moved into `idem_mid` that transaction
# renames it to a run, `idem_YYYYMMDD_N` (the UTC day of its newest key, N the last log row
# merged), and makes a new empty `idem_mid`. A run is never written again and is dropped whole
# once its newest key expired. So a key is inserted into one B-tree, once, and never deleted;
# the levels before (`idem_recent` -> `idem_mid` -> the day's table, each move an insert and a
# delete) inserted it three times and deleted it twice, and the last move's cost grew with the
# day's table (claims 5.7 -> 11.4 µs a key from the first to the last 200k of 1M). What it
# costs: `seen` probes `idem_mid` and every live run for the keys the filter may hold, and a
# process keeps the log's unmerged keys in memory (a log row cannot be searched by key).
# Measured in bench/bench_idem_sqlite.py (docs/benchmarks.md).
IDEM_RECENT = "idem_recent"  # the level before the log took its place: empty (migration 16)
IDEM_MID = "idem_mid"
RECENT_KEYS = 50_000
# A merge's slice (12,500 random keys) dirties most of `idem_mid`'s leaf pages whatever its
# size, and each dirtied page is written to the WAL and copied back: the smaller `idem_mid`,
# the fewer pages a key costs. bench_idem_sqlite, CPU a key (docs/benchmarks.md): 1M keys
# 6.3 (500,000) -> 4.3 (250,000); 3M keys 7.0 -> 4.9 (125,000: 4.1, but twice the runs
# again for every key the filter may hold to be probed in).
MID_KEYS = 250_000
# `seen` asks an in-memory filter first and SQLite only for the keys the filter may hold
# (SQLiteIdempotencyStore); the filter learns every process's claims from this log, whose
# merged rows are kept LOG_KEEP seconds (a process that fell further behind rebuilds its filter).
IDEM_LOG = "idem_log"
LOG_KEEP = 300.0


class _Bloom:
    """A Bloom filter of up to BLOOM_KEYS 32-byte digests, eight bits set a key (~0.06 % false
    positives when full, 16 bits of filter a key; four gave ~0.24 %, two ~1.4 %), and the newest
    claim time of its keys (it is dropped once that expired). Every false positive is probed in
    `idem_mid` and every live run, so a key's `seen` cost grew with the runs (filters x runs):
    bench_idem_sqlite --stores 2, docs/benchmarks.md. The keys are SHA-256 digests: their bytes
    are the hash, a key's eight 32-bit words its eight positions."""

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


def _turned(blob: bytes, pair: int) -> bytes:
    """`blob` turned by 8 bytes a pair: each key's first two words are then its words
    2 * pair and 2 * pair + 1, so the two-position steps below give a key's other positions."""
    return blob[8 * pair :] + blob[: 8 * pair]


# the pairs of words of a key after the first: three more pairs, eight positions in all
_PAIRS = (1, 2, 3)


def _set_bits(bits: bytearray, blob: bytes) -> None:
    """Set the two positions (first two words) of each key of `blob`."""
    if _BLOOM_ADD is not None:
        _BLOOM_ADD(bits, blob)
        return
    ps, qs = _words(blob)
    for p, q in zip(ps, qs, strict=True):
        bits[p >> 3] |= 1 << (p & 7)
        bits[q >> 3] |= 1 << (q & 7)


def _has_bits(bits: bytearray, blob: bytes) -> list[int]:
    """Indexes of the keys of `blob` whose two positions (first two words) are both set."""
    if _BLOOM_MAYBE is not None:
        return list(_BLOOM_MAYBE(bits, blob))
    ps, qs = _words(blob)
    return [
        i
        for i, (p, q) in enumerate(zip(ps, qs, strict=True))
        if bits[p >> 3] >> (p & 7) & 1 and bits[q >> 3] >> (q & 7) & 1
    ]


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
        _set_bits(bloom.bits, blob)
        for pair in _PAIRS:
            _set_bits(bloom.bits, _turned(blob, pair))
        bloom.n += n
        bloom.newest = max(bloom.newest, claimed_at)

    def maybe(self, blob: bytes) -> list[int]:
        """Indexes of the keys of `blob` that may have been added: all eight positions set in
        one filter (each further pair asked only of the keys the pairs before let through)."""
        found: set[int] = set()
        for bloom in self._blooms:
            left = _has_bits(bloom.bits, blob)
            for pair in _PAIRS:
                if not left:
                    break
                few = b"".join(blob[i * 32 : i * 32 + 32] for i in left)
                left = [left[j] for j in _has_bits(bloom.bits, _turned(few, pair))]
            found.update(left)
        return sorted(found)

    def expire(self, before: float) -> None:
        """Drop the filters whose newest key was claimed at or before `before`."""
        self._blooms = [b for b in self._blooms if b.newest > before]


def idem_table(day: int) -> str:
    """`idem_20261201` for day number `day` (days since 1970-01-01 UTC): a day table of the
    code before the runs."""
    return IDEM_PREFIX + datetime.fromtimestamp(day * DAY, UTC).strftime("%Y%m%d")


def idem_run(day: int, last: int) -> str:
    """`idem_20261201_1234`: a run of keys whose newest was claimed on day `day`, made when
    log row `last` was merged (unique in the file: log ids are never reused)."""
    return f"{idem_table(day)}_{last}"


@functools.lru_cache(maxsize=4096)
def _table_day(table: str) -> tuple[int, int] | None:
    """(day number, run number: 0 for a day table) of a table of keys, None for any other.
    Cached: every `seen` lists the runs (`idem_tables`), and `strptime` of each of ~70 names
    (bench_steady's store at its end) showed in its stall dumps."""
    digits, _, run = table.removeprefix(IDEM_PREFIX).partition("_")
    if len(digits) != 8 or not digits.isdigit() or (run and not run.isdigit()):
        return None
    try:
        day = int(datetime.strptime(digits, "%Y%m%d").replace(tzinfo=UTC).timestamp()) // DAY
    except ValueError:
        return None
    return day, int(run or 0)


def idem_day(table: str) -> int | None:
    """The day a table of keys (a run or a day table) expires by, None for any other table."""
    found = _table_day(table)
    return None if found is None else found[0]


def idem_tables(c: sqlite3.Connection, schema: str = "main") -> list[tuple[int, str]]:
    """The runs and day tables in the file (every process's), (day, name), newest first."""
    (names,) = c.execute(
        f"SELECT group_concat(name, ' ') FROM {schema}.sqlite_master WHERE type = 'table'"
        f" AND name GLOB '{IDEM_PREFIX}[0-9]*'"
    ).fetchone()
    found = [(d, n) for n in (names or "").split() if (d := _table_day(n)) is not None]
    return [(d[0], n) for d, n in sorted(found, reverse=True)]


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
IDEM_MIGRATIONS: tuple[Migration, ...] = tuple(
    m for m in MIGRATIONS if m.version in (13, 14, 15, 16)
)


def idem_path(state: Path) -> Path:
    """The idempotency keys' file for state file `state`: `state.idem.db` for `state.db`."""
    state = Path(state)
    return state.with_name(f"{state.stem}.idem{state.suffix}")


def _state_keys(c: sqlite3.Connection) -> bool:
    """Whether the state file still holds idempotency keys (claimed before the keys had a
    file of their own)."""
    return (
        bool(idem_tables(c))
        or any(
            c.execute(f"SELECT EXISTS (SELECT 1 FROM {t})").fetchone()[0]
            for t in (IDEM_RECENT, IDEM_MID)
        )
        or _waiting(c) > 0
    )


def _copy_state_keys(state: Path) -> Callable[[sqlite3.Connection], None]:
    """A `run` callable on the idempotency file: copy every key of the state file's tables
    into the same table here (`idem_recent`'s and its log's unmerged rows' into `idem_mid`;
    a key already here keeps its latest claim), in one transaction."""

    def copy(c: sqlite3.Connection) -> None:
        c.execute("ATTACH DATABASE ? AS state", (str(state),))
        try:
            with immediate(c):
                unmerged = c.execute(
                    f"SELECT claimed_at, keys FROM state.{IDEM_LOG} WHERE id >"
                    f" (SELECT through FROM state.{IDEM_LOG}_merged) ORDER BY id"
                ).fetchall()
                for i in range(0, len(unmerged), _MERGE_ROWS):
                    _insert_sorted(c, unmerged[i : i + _MERGE_ROWS])
                tables = [(n, n) for _, n in idem_tables(c, "state")]
                for source, target in [(IDEM_RECENT, IDEM_MID), (IDEM_MID, IDEM_MID), *tables]:
                    c.execute(_IDEM_DAY_DDL.format(f"main.{target}"))
                    c.execute(
                        f"INSERT INTO main.{target} SELECT key, claimed_at FROM state.{source}"
                        f" WHERE true{_UPSERT}"
                    )
        finally:
            c.execute("DETACH DATABASE state")

    return copy


def _drop_state_keys(c: sqlite3.Connection) -> None:
    """On the state file, once its keys were copied: empty `idem_recent`, `idem_mid` and the
    log, drop the runs and day tables (nothing claims there any more)."""
    with immediate(c):
        for table in (IDEM_RECENT, IDEM_MID, IDEM_LOG):
            c.execute(f"DELETE FROM {table}")
        for _, table in idem_tables(c):
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
    """Implements IdempotencyStore: 32-byte keys as BLOBs with their claim time. A claim
    appends its keys to `idem_log` (one row); once `recent_keys` keys wait there unmerged, a
    claim moves the oldest of them (`slice_keys`, a quarter of RECENT_KEYS by default, so
    the next claims move the rest: one long transaction would hold every other process's
    claims for its whole length), sorted, into `idem_mid` in one transaction with the mark of
    the last row merged (`idem_log_merged`); once `mid_keys` were moved into `idem_mid`, that
    transaction renames it to a run of its newest key's day (`idem_YYYYMMDD_N`) and makes a
    new one (see the comment at IDEM_LOG's definitions). A key is in the log (unmerged) or in
    `idem_mid` or a run at every commit, whatever instant a process is killed. Runs (and the
    day tables of older code) are dropped whole by the first claim or merge after their
    newest key expired; seen() ignores keys older than the TTL at once, and a merge carries
    only unexpired keys on.

    seen() asks an in-memory filter (`KeyFilter`) of every key claimed in the file by any
    process, built from the tables and the log at the first seen(), then kept up from the
    log's rows after the last it read. A Bloom filter never answers "no" for a key it holds,
    so a key it rules out was never claimed (or its claim expired); the rest are looked up
    exactly: among the log's unmerged rows, which the process keeps in memory as sets, then
    in `idem_mid` and the live runs, all in one read transaction with the log's marks (a
    merge or a rename by another process cannot slip between). Merged log rows older than
    LOG_KEEP are pruned by the merges; a process that finds rows it did not read pruned
    builds its filter again."""

    def __init__(
        self,
        db: SQLiteDB,
        ttl_seconds: int = 7 * 86400,
        clock: Clock = time.time,
        recent_keys: int = RECENT_KEYS,
        mid_keys: int = MID_KEYS,
        slice_keys: int = RECENT_KEYS // 4,
    ) -> None:
        self._db = db
        self._ttl = ttl_seconds
        self._clock = clock
        self._recent_keys = recent_keys
        self._mid_keys = mid_keys
        # keys one merge transaction moves at most (its oldest rows, at least one): a merge
        # holds the file's writer lock, and the pod's other worker waits for it to claim
        self._slice_keys = max(1, slice_keys)
        # Read and written only in the DB thread: when the oldest table in the file expires
        # whole (None: not looked yet), and the keys waiting in the log unmerged as far as
        # this process knows (the unmerged rows it read, plus its claims since; None: not
        # counted yet, e.g. after a restart).
        self._next_drop: float | None = None
        self._unmerged: int | None = None
        # The keys claimed in the file, as far as this process knows (built at its first
        # seen(), then kept up from `idem_log`), the last log row it read (None: not built),
        # and the log's unmerged rows it read: id -> (claimed_at, keys).
        self._filter = KeyFilter()
        self._logged: int | None = None
        self._pending: dict[int, _Unmerged] = {}

    def _live(self, tables: Sequence[tuple[int, str]], now: float) -> list[str]:
        """Tables that may hold unexpired keys, newest first."""
        return [name for day, name in tables if (day + 1) * DAY + self._ttl > now]

    async def seen(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        blob = _key_blob(keys)
        now = self._clock()
        since = now - self._ttl

        def lookup(c: sqlite3.Connection) -> list[int]:
            self._catch_up(c, now)
            maybe = self._filter.maybe(blob)
            if not maybe:
                return []
            hits, rest = [], []
            for i in maybe:
                key = blob[i * 32 : i * 32 + 32]
                if any(row.at > since and row.has(key) for row in self._pending.values()):
                    hits.append(i)
                else:
                    rest.append(i)
            if not rest:
                return hits
            # only the keys the filter may hold are looked up, in `idem_mid` and every run
            few = b"".join(blob[i * 32 : i * 32 + 32] for i in rest)
            tables = [IDEM_MID, *self._live(idem_tables(c), now)]
            probe = " OR ".join(
                f"EXISTS (SELECT 1 FROM {t} WHERE key = substr(?1, i, 32) AND claimed_at > ?2)"
                for t in tables
            )
            sql = f"{_KEYS} SELECT group_concat(i) FROM k WHERE {probe}"
            found: str | None = c.execute(sql, (few, since)).fetchone()[0]
            return hits + ([rest[(int(i) - 1) // 32] for i in found.split(",")] if found else [])

        hits = await self._db.call("idempotency", lambda c: _again_if_dropped(c, _read(lookup)))
        found = [False] * len(keys)
        for i in hits:
            found[i] = True
        return found

    def _catch_up(self, c: sqlite3.Connection, now: float) -> None:
        """In the DB thread, inside a read transaction, before the filter answers: add the
        keys claimed (by any process) since it last looked, from `idem_log`, and keep the
        unmerged rows' keys; build both afresh if it has none yet or if rows it has not read
        were pruned."""
        (pruned,) = c.execute(f"SELECT through FROM {IDEM_LOG}_pruned").fetchone()
        (merged,) = c.execute(f"SELECT through FROM {IDEM_LOG}_merged").fetchone()
        if self._logged is None or pruned > self._logged:
            self._build(c, now, merged)
        else:
            for id_, claimed_at, keys in c.execute(
                f"SELECT id, claimed_at, keys FROM {IDEM_LOG} WHERE id > ? ORDER BY id",
                (self._logged,),
            ):
                self._filter.add(keys, claimed_at)
                if id_ > merged:
                    self._pending[id_] = _Unmerged(claimed_at, keys)
                self._logged = id_
            if self._pending and min(self._pending) <= merged:
                self._pending = {i: p for i, p in self._pending.items() if i > merged}
        self._unmerged = sum(len(row) for row in self._pending.values())
        # its keys all expired (an hour's margin for a clock set back)
        self._filter.expire(now - self._ttl - 3600)

    def _build(self, c: sqlite3.Connection, now: float, merged: int) -> None:
        """Inside a read transaction: the filter from every unexpired key in the tables and
        the log's unmerged rows, those rows' keys, and the log's last id (every later claim
        is in a later row). Kept only if whole."""
        self._logged = None
        built = KeyFilter()
        (logged,) = c.execute(f"SELECT COALESCE(max(id), 0) FROM {IDEM_LOG}").fetchone()
        since = now - self._ttl
        for table in [IDEM_MID, *self._live(idem_tables(c), now)]:
            cur = c.execute(f"SELECT key, claimed_at FROM {table} WHERE claimed_at > ?", (since,))
            while rows := cur.fetchmany(65536):
                # (seen() takes 32-byte keys only: no other could match)
                keys = b"".join(k for k, _ in rows if len(k) == 32)
                built.add(keys, max(t for _, t in rows))
        pending: dict[int, _Unmerged] = {}
        for id_, claimed_at, keys in c.execute(
            f"SELECT id, claimed_at, keys FROM {IDEM_LOG} WHERE id > ? AND claimed_at > ?",
            (merged, since),
        ):
            built.add(keys, claimed_at)
            pending[id_] = _Unmerged(claimed_at, keys)
        self._filter, self._logged, self._pending = built, logged, pending

    async def claim(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        blob = _key_blob(keys)
        now = self._clock()

        def write(c: sqlite3.Connection) -> None:
            # one statement, its own transaction (as `immediate` would make it, without the
            # BEGIN and COMMIT that each take the GIL back under the writer lock)
            autocommit(c, f"INSERT INTO {IDEM_LOG} (claimed_at, keys) VALUES (?, ?)", (now, blob))
            if self._unmerged is None:
                self._unmerged = _waiting(c)
            else:
                self._unmerged += len(keys)
            if self._unmerged >= self._recent_keys:
                self._merge(c, now)
            elif self._next_drop is None or now >= self._next_drop:
                with immediate(c):
                    self._drop_expired(c, now)

        await self._db.call("idempotency", write)

    def _merge(self, c: sqlite3.Connection, now: float) -> None:
        """Move the log's oldest unmerged rows, up to `slice_keys` keys (if `recent_keys`
        wait: another process may have merged them meanwhile), sorted, into `idem_mid`, and
        mark them merged; rename
        `idem_mid` to a run once `mid_keys` were moved into it; prune the merged rows older
        than LOG_KEEP; drop the expired tables. One transaction."""
        since = now - self._ttl
        with immediate(c):
            through, mid_keys, mid_newest = c.execute(
                f"SELECT through, mid_keys, mid_newest FROM {IDEM_LOG}_merged"
            ).fetchone()
            self._unmerged = waiting = _waiting(c)
            if waiting < self._recent_keys:
                return
            # the slice's rows found by their lengths (no overflow page read), then only
            # their keys read: the rows after the slice wait for the next claims' merges
            taken, cut = 0, through
            sizes = c.execute(
                f"SELECT id, length(keys) FROM {IDEM_LOG} WHERE id > ? ORDER BY id", (through,)
            ).fetchall()
            for id_, size in sizes:
                taken, cut = taken + size // 32, id_
                if taken >= self._slice_keys:
                    break
            rows = c.execute(
                f"SELECT id, claimed_at, keys FROM {IDEM_LOG} WHERE id > ? AND id <= ? ORDER BY id",
                (through, cut),
            ).fetchall()
            live = [(at, keys) for _, at, keys in rows if at > since]
            for i in range(0, len(live), _MERGE_ROWS):
                _insert_sorted(c, live[i : i + _MERGE_ROWS])
            if live:
                mid_keys += sum(len(keys) // 32 for _, keys in live)
                mid_newest = max(mid_newest, max(at for at, _ in live))
            last = rows[-1][0]
            if mid_keys >= self._mid_keys:
                run = idem_run(int(mid_newest // DAY), last)
                c.execute(f"ALTER TABLE {IDEM_MID} RENAME TO {run}")
                c.execute(_IDEM_DAY_DDL.format(IDEM_MID))
                mid_keys, mid_newest = 0, 0.0
            c.execute(
                f"UPDATE {IDEM_LOG}_merged SET through = ?, mid_keys = ?, mid_newest = ?",
                (last, mid_keys, mid_newest),
            )
            # the merged rows before the first one younger than LOG_KEEP: a scan from the
            # log's start that stops there (the rows a merge or two ago left), where
            # max(id) over `claimed_at < ?` read every row kept (LOG_KEEP s of claims, ~6,000
            # rows at 25k keys/s), 15 % of a merging thread (bench_idem_sqlite --stores 2)
            young = c.execute(
                f"SELECT id FROM {IDEM_LOG} WHERE id <= ? AND claimed_at >= ? ORDER BY id LIMIT 1",
                (last, now - LOG_KEEP),
            ).fetchone()
            (old,) = c.execute(
                f"SELECT max(id) FROM {IDEM_LOG} WHERE id < ?",
                (last + 1 if young is None else young[0],),
            ).fetchone()
            if old is not None:
                c.execute(f"DELETE FROM {IDEM_LOG} WHERE id <= ?", (old,))
                c.execute(f"UPDATE {IDEM_LOG}_pruned SET through = max(through, ?)", (old,))
            self._drop_expired(c, now)
        self._unmerged = waiting - taken

    def _drop_expired(self, c: sqlite3.Connection, now: float) -> None:
        """Inside a write transaction: drop the runs and day tables whose newest key expired;
        look again when the oldest left expires, or a day from now (a run made meanwhile)."""
        tables = idem_tables(c)
        live = set(self._live(tables, now))
        for _, name in tables:
            if name not in live:
                c.execute(f"DROP TABLE {name}")
        kept = [(day + 1) * DAY + self._ttl for day, name in tables if name in live]
        self._next_drop = min([now + DAY, *kept])

    async def stats(self) -> dict[str, Any]:
        now = self._clock()
        since = now - self._ttl

        def query(c: sqlite3.Connection) -> tuple[int, float | None]:
            (merged,) = c.execute(f"SELECT through FROM {IDEM_LOG}_merged").fetchone()
            n, oldest = c.execute(
                f"SELECT COALESCE(sum(length(keys)), 0) / 32, min(claimed_at) FROM {IDEM_LOG}"
                " WHERE id > ? AND claimed_at > ?",
                (merged, since),
            ).fetchone()
            for table in [*self._live(idem_tables(c), now), IDEM_MID]:
                count, first = c.execute(
                    f"SELECT count(*), min(claimed_at) FROM {table} WHERE claimed_at > ?",
                    (since,),
                ).fetchone()
                n += count
                if first is not None and (oldest is None or first < oldest):
                    oldest = first
            return n, oldest

        n, oldest = await self._db.call("idempotency", lambda c: _again_if_dropped(c, _read(query)))
        return {
            "backend": "sqlite",
            "keys": n,
            "memory_bytes": None,
            "oldest_bucket": _utc(oldest).date().isoformat() if oldest is not None else None,
        }


# Log rows a merge statement takes (a compound SELECT has at most 500 terms).
_MERGE_ROWS = 200


def _insert_sorted(c: sqlite3.Connection, rows: Sequence[tuple[float, bytes]]) -> None:
    """Insert the keys of log rows (claim time, keys) into `idem_mid` in key order, with
    their rows' claim times: one statement, the rows' blobs and times bound as parameters
    (each blob is cut in SQL, the keys sorted by SQLite's sorter: ~1 µs a key less than
    sorting in Python; `substr` of a column instead would read the whole overflowing blob
    again for every key)."""
    longest = max(len(keys) for _, keys in rows)
    terms = " UNION ALL ".join(
        f"SELECT substr(?{2 * j + 1}, i, 32) AS key, ?{2 * j + 2} AS at FROM k"
        f" WHERE i < length(?{2 * j + 1})"
        for j in range(len(rows))
    )
    c.execute(
        f"WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 32 FROM k WHERE i + 32 < ?"
        f"{2 * len(rows) + 1}) INSERT INTO {IDEM_MID} (key, claimed_at) SELECT key, at"
        f" FROM ({terms}) WHERE true ORDER BY key{_UPSERT}",
        [*(x for at, keys in rows for x in (keys, at)), longest],
    )


def _waiting(c: sqlite3.Connection) -> int:
    """Keys in the log's unmerged rows (`length` of a blob reads no overflow page)."""
    (n,) = c.execute(
        f"SELECT COALESCE(sum(length(keys)), 0) / 32 FROM {IDEM_LOG}"
        f" WHERE id > (SELECT through FROM {IDEM_LOG}_merged)"
    ).fetchone()
    return int(n)


def _key_set(blob: bytes) -> frozenset[bytes]:
    return frozenset(blob[i : i + 32] for i in range(0, len(blob), 32))


class _Unmerged:
    """An unmerged log row a process read: its claim time, its keys as the row's blob, and
    their set, built the first time `seen` asks it for a key (a key the filter may hold:
    rare for new keys). Every worker reads every row claimed in the file, its own and the
    others'; building each row's set as it was read cost ~0.18 µs a key in each worker."""

    __slots__ = ("_keys", "at", "blob")

    def __init__(self, at: float, blob: bytes) -> None:
        self.at = at
        self.blob = blob
        self._keys: frozenset[bytes] | None = None

    def __len__(self) -> int:
        """The row's keys (as `_waiting` counts them)."""
        return len(self.blob) // 32

    def has(self, key: bytes) -> bool:
        if self._keys is None:
            self._keys = _key_set(self.blob)
        return key in self._keys


def _read(fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """`fn` in one read transaction: the tables it lists and the rows it reads are of one
    instant (another process's merge or rename commits wholly before or after it)."""

    def read(c: sqlite3.Connection) -> T:
        c.execute("BEGIN")
        try:
            return fn(c)
        finally:
            c.execute("COMMIT")

    return read


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
