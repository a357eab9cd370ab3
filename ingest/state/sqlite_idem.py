"""The idempotency keys' store on SQLite (`SQLiteIdempotencyStore`), in a file of its own
beside the state file (`state.idem.db` beside `state.db`, `open_idempotency_db`): a claim
appends its keys to a log, merged in sorted slices into `idem_mid`, renamed to a run once
large enough; `seen` asks an in-memory Bloom filter of every claimed key (`KeyFilter`) first.

The tables' schema (migrations 12-16) is the state file's, in `ingest.state.sqlite.MIGRATIONS`,
with the connections, the writer lock and the checkpoints this module uses; split from that
module (no behaviour changed) so that each stays short.
"""

from __future__ import annotations

import bisect
import functools
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

from ingest import native
from ingest.state.sqlite import (
    _IDEM_DAY_DDL,
    _UPSERT,
    DAY,
    IDEM_LOG,
    IDEM_MID,
    IDEM_PREFIX,
    IDEM_RECENT,
    MIGRATIONS,
    Clock,
    Migration,
    SQLiteDB,
    _utc,
    autocommit,
    idem_table,
    immediate,
)

T = TypeVar("T")

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
RECENT_KEYS = 50_000
# A merge's slice (SLICE_KEYS random keys) dirties most of `idem_mid`'s leaf pages whatever
# its size, and in a pod each of them is read again first (the other worker's commits emptied
# this connection's cache), written to the WAL and copied back: a merge costs about its
# keys' B-tree inserts plus all of `idem_mid`'s pages. So the smaller `idem_mid` and the
# larger the slice, the fewer page reads and writes a key. bench_idem_sqlite --stores 2, the
# store threads' CPU a key over 1M keys (docs/benchmarks.md, embu): 4.7 at 250,000 / 12,500,
# 3.0 at 125,000 / 25,000, for twice the runs (a key the filter may hold is probed in its
# filter's runs: ~32 instead of ~16), and merges that last no longer (worst claim 135-333
# ms against 218-608, load 5). Before: 500,000 -> 250,000 took 6.3 -> 4.3 µs a key (one store).
# Now MID_KEYS = SLICE_KEYS: every merge's slice is a run of its own, written as that run (a
# new table, unsorted, `_merge`) and `idem_mid` stays empty: no page of a merge's table is
# read or written twice. Process CPU 3.4-3.6 -> 2.5 µs a key, store threads 2.8-3.0 -> 2.0
# (bench_idem_sqlite --stores 2, 1M keys, docs/benchmarks.md, emidem), for 5x the runs (a
# run of 25,000 keys, each a table: a key the filter may hold is probed in more of them;
# every merge changes the schema, which each other connection of the file reads again:
# ~0.6 ms at 75 tables, ~2.5 at 400).
# Keys one merge transaction moves at most: half of RECENT_KEYS, so two claims' merges move
# what waits (a merge holds the file's writer lock, and the pod's other worker waits for it to
# claim: one 50,000-key merge into an `idem_mid` of up to 500,000 held it off 0.3-1.1 s at
# load 7-10; see MID_KEYS for what the larger slice saves).
SLICE_KEYS = RECENT_KEYS // 2
MID_KEYS = SLICE_KEYS
# `seen` asks an in-memory filter first and SQLite only for the keys the filter may hold
# (SQLiteIdempotencyStore); the filter learns every process's claims from this log, whose
# merged rows are kept LOG_KEEP seconds (a process that fell further behind rebuilds its filter).
LOG_KEEP = 300.0
# A merge's slice is a run of rows (its ordinal, key) appended to the newest table of slices,
# `idem_sYYYYMMDD_F` (the day of its newest key, F the log row merged for its first slice),
# up to GROUP_SLICES slices a table: a table a merge made every other connection of the file
# parse the whole schema again at its next statement (2 ms at 400 runs, 29 at 4,000, 190-230
# at 10,000: 13 µs a key in a 2-worker pod at 10,000, 2.7 at 400), and a slice appended at
# the B-tree's right edge is no schema change. A new table only every GROUP_SLICES merges, so
# 10,000 runs' worth of keys are 1,250 tables; a table is dropped whole once its newest key
# expired: 8 slices ~25 ms of CPU, less than a merge's own hold of the writer lock (33-38 ms;
# 16 slices took ~50). docs/benchmarks.md, idemruns.
GROUP_SLICES = 8
IDEM_SLICES = "idem_s"
_SLICES_DDL = (
    "CREATE TABLE IF NOT EXISTS {} (slice INTEGER NOT NULL, key BLOB NOT NULL,"
    " claimed_at REAL NOT NULL, PRIMARY KEY (slice, key)) WITHOUT ROWID"
)


class _Bloom:
    """A Bloom filter of up to KEYS 32-byte digests, eight bits set a key, 32 bits of filter a
    key (~0.0016 % false positives when full; 16 bits a key gave ~0.06 %), and the newest claim
    time of its keys (it is dropped once that expired). Every false positive is probed in its
    filter's runs, one a merge of SLICE_KEYS keys (~160 a full filter), so a key's `seen` cost
    grew with filters x runs at 16 bits a key: bench_idem_sqlite --stores 2, docs/benchmarks.md.
    The keys are SHA-256 digests: their bytes are the hash, a key's eight 32-bit words its
    eight positions, all in one block of 512 bits (64 bytes, a cache line: `_positions`), so
    adding or asking a key costs one cache miss of the 16 MiB, not eight (a key added 0.15 ->
    0.09 µs compiled, and every worker adds every key claimed in the file), for ~3x the false
    positives of eight bits anywhere: the blocks fill unevenly (docs/benchmarks.md, idemscale)."""

    __slots__ = ("bits", "n", "newest", "rows")
    BITS = 1 << 27  # 16 MiB
    KEYS = 1 << 22  # 32 bits a key

    def __init__(self) -> None:
        self.bits = bytearray(self.BITS >> 3)
        self.n = 0
        self.newest = float("-inf")
        # the first and last log row whose keys it holds (rows are added in id order), so
        # the runs a key it may hold can be in; None: it holds keys read from the tables (a
        # build), which may be in any of them
        self.rows: tuple[int, int] | None = None


def _positions(blob: bytes) -> list[list[int]]:
    """Each 32-byte key's eight bits in the filter: its block of 512 bits (the top 18 bits of
    its first 32-bit word) and in it the low 9 bits of each of its eight words."""
    words = memoryview(blob).cast("I").tolist()
    return [
        [((words[i] >> 14) << 9) + (w & 511) for w in words[i : i + 8]]
        for i in range(0, len(words), 8)
    ]


def _load_bloom() -> tuple[
    Callable[[bytearray, bytes], None] | None, Callable[[bytearray, bytes], list[int]] | None
]:
    """`add` and `maybe` of one filter compiled (`ingest_native`, the same bits as the Python
    loops below, ~50x faster: every process adds every key claimed in the file, its own and
    the other workers', on a thread that holds the GIL beside the event loop); None, None
    when the extension is missing or older than these functions."""
    add, maybe = native.function("bloom_block_add"), native.function("bloom_block_maybe")
    return (add, maybe) if add is not None and maybe is not None else (None, None)


_BLOOM_ADD, _BLOOM_MAYBE = _load_bloom()


def _set_bits(bits: bytearray, blob: bytes) -> None:
    """Set the eight bits of each key of `blob`."""
    if _BLOOM_ADD is not None:
        _BLOOM_ADD(bits, blob)
        return
    for key in _positions(blob):
        for p in key:
            bits[p >> 3] |= 1 << (p & 7)


def _has_bits(bits: bytearray, blob: bytes) -> list[int]:
    """Indexes of the keys of `blob` whose eight bits are all set."""
    if _BLOOM_MAYBE is not None:
        return list(_BLOOM_MAYBE(bits, blob))
    return [
        i for i, key in enumerate(_positions(blob)) if all(bits[p >> 3] >> (p & 7) & 1 for p in key)
    ]


class KeyFilter:
    """The claimed keys as a chain of Bloom filters: `maybe` never answers False for a key
    added (and not yet dropped as expired); True may be wrong and is checked in SQLite."""

    def __init__(self) -> None:
        self._blooms: list[_Bloom] = []

    def __len__(self) -> int:
        return sum(b.n for b in self._blooms)

    def add(self, blob: bytes, claimed_at: float, row: int | None = None) -> None:
        """Add the keys of `blob`: log row `row`'s (rows in id order), or None: keys read
        from the tables."""
        n = len(blob) // 32
        if not self._blooms or self._blooms[-1].n + n > _Bloom.KEYS:
            self._blooms.append(_Bloom())
        bloom = self._blooms[-1]
        _set_bits(bloom.bits, blob)
        if row is None:
            bloom.rows = None
        elif bloom.n == 0:
            bloom.rows = (row, row)
        elif bloom.rows is not None:
            bloom.rows = (bloom.rows[0], row)
        bloom.n += n
        bloom.newest = max(bloom.newest, claimed_at)

    def maybe(self, blob: bytes) -> list[int]:
        """Indexes of the keys of `blob` that may have been added: all eight positions set in
        one filter."""
        found: set[int] = set()
        for _, left in self.maybe_rows(blob):
            found.update(left)
        return sorted(found)

    def maybe_rows(self, blob: bytes) -> list[tuple[tuple[int, int] | None, list[int]]]:
        """`maybe` by filter: (the log rows the filter holds, `_Bloom.rows`; the indexes of
        the keys of `blob` it may hold) for each filter that may hold some."""
        out: list[tuple[tuple[int, int] | None, list[int]]] = []
        for bloom in self._blooms:
            left = _has_bits(bloom.bits, blob)
            if left:
                out.append((bloom.rows, left))
        return out

    def expire(self, before: float) -> None:
        """Drop the filters whose newest key was claimed at or before `before`."""
        self._blooms = [b for b in self._blooms if b.newest > before]


def idem_run(day: int, last: int) -> str:
    """`idem_20261201_1234`: a run of keys whose newest was claimed on day `day`, made when
    log row `last` was merged (unique in the file: log ids are never reused)."""
    return f"{idem_table(day)}_{last}"


def idem_slices(day: int, first: int) -> str:
    """`idem_s20261201_1234`: a table of slices whose newest key was claimed on day `day` or
    before, its first slice made when log row `first` was merged."""
    return f"{IDEM_SLICES}{idem_table(day).removeprefix(IDEM_PREFIX)}_{first}"


def _sliced(table: str) -> bool:
    """Whether a table of keys (`_table_day` not None) is a table of slices."""
    return table.startswith(IDEM_SLICES)


@functools.lru_cache(maxsize=1 << 16)
def _table_day(table: str) -> tuple[int, int] | None:
    """(day number, run number: 0 for a day table; for a table of slices its first slice's)
    of a table of keys, None for any other.
    Cached: every `seen` lists the runs (`idem_tables`), and `strptime` of each of ~70 names
    (bench_steady's store at its end) showed in its stall dumps. The cache holds 65,536
    names and the date is read without `strptime`: at 4,096 a store of more runs missed it
    for every name of every listing (10,000 runs: 127 ms a listing, docs/benchmarks.md)."""
    name = table.removeprefix(IDEM_PREFIX)
    digits, _, run = name.removeprefix("s").partition("_")
    if len(digits) != 8 or not digits.isdigit() or (run and not run.isdigit()):
        return None
    if name.startswith("s") and not run:
        return None
    try:
        day = date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).toordinal() - _EPOCH
    except ValueError:
        return None
    return day, int(run or 0)


_EPOCH = date(1970, 1, 1).toordinal()


def idem_day(table: str) -> int | None:
    """The day a table of keys (a run or a day table) expires by, None for any other table."""
    found = _table_day(table)
    return None if found is None else found[0]


def idem_tables(c: sqlite3.Connection, schema: str = "main") -> list[tuple[int, str]]:
    """The tables of slices, runs and day tables in the file (every process's), (day, name),
    newest first."""
    (names,) = c.execute(
        f"SELECT group_concat(name, ' ') FROM {schema}.sqlite_master WHERE type = 'table'"
        f" AND (name GLOB '{IDEM_PREFIX}[0-9]*' OR name GLOB '{IDEM_SLICES}[0-9]*')"
    ).fetchone()
    found = [(d, n) for n in (names or "").split() if (d := _table_day(n)) is not None]
    return [(d[0], n) for d, n in sorted(found, reverse=True)]


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
    a table of slices' into the day table of its day, which every `seen` probes: its slices'
    log rows are the state file's, so no filter here says which of them holds a key; a key
    already here keeps its latest claim), in one transaction."""

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
                tables = [
                    (n, idem_table(d) if _sliced(n) else n) for d, n in idem_tables(c, "state")
                ]
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


# --------------------------------------------------------------------------------- idempotency


# The batch's keys travel as one blob of 32-byte digests, cut in SQL: one statement per batch,
# which SQLite runs without taking the GIL back per key as executemany does (in the service,
# beside the event loop's thread: 5.2 instead of 6.6 µs of CPU per claimed key).
_KEYS = (
    "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 32 FROM k WHERE i + 32 <= length(?1))"
)


# `seen` key lists whose blobs a store keeps for their batch's claim: the runner looks the
# next batch up while this one is written (two), and a retried lookup may come between.
_BLOBS = 4


_KEY_BLOB = native.function("key_blob")  # the same, checked and joined in one compiled pass


def _key_blob(keys: Sequence[bytes]) -> bytes:
    """The Python twin of the compiled `key_blob` (`SQLiteIdempotencyStore._blob` asks that
    first, for a list, where the extension is built)."""
    # the lengths' set in C, not a generator step a key: ~135 vs ~320 ns a key here, twice
    # a record (seen and claim) on the event loop
    if not set(map(len, keys)) <= {32}:
        raise ValueError("idempotency keys are 32-byte digests")
    return b"".join(keys)


class SQLiteIdempotencyStore:
    """Implements IdempotencyStore: 32-byte keys as BLOBs with their claim time. A claim
    appends its keys to `idem_log` (one row); once `recent_keys` keys wait there unmerged, a
    claim moves the oldest of them (`slice_keys`, half of RECENT_KEYS by default, so the
    next claim moves the rest: one long transaction would hold every other process's claims
    for its whole length), sorted, into `idem_mid` in one transaction with the mark of
    the last row merged (`idem_log_merged`); once `mid_keys` were moved into `idem_mid`, that
    transaction copies it as a slice into the newest table of slices (`idem_sYYYYMMDD_F`,
    see GROUP_SLICES) and empties it (see the comment at IDEM_LOG's definitions). A key is in
    the log (unmerged) or in `idem_mid` or a slice at every commit, whatever instant a process
    is killed. Tables of slices (and the runs and day tables of older code) are dropped whole
    after their newest key expired, one table of slices (or GROUP_SLICES runs) a transaction
    of its own, by the claims that follow; seen() ignores keys older than the TTL at once, and
    a merge carries only unexpired keys on.

    seen() asks an in-memory filter (`KeyFilter`) of every key claimed in the file by any
    process, built from the tables and the log at the first seen(), then kept up from the
    log's rows after the last it read. A Bloom filter never answers "no" for a key it holds,
    so a key it rules out was never claimed (or its claim expired); the rest are looked up
    exactly: among the log's unmerged rows, which the process keeps in memory as sets, then
    in `idem_mid` and the live tables, all in one read transaction with the log's marks (a
    merge by another process cannot slip between). Merged log rows older than
    LOG_KEEP are pruned by the merges; a process that finds rows it did not read pruned
    builds its filter again."""

    def __init__(
        self,
        db: SQLiteDB,
        ttl_seconds: int = 7 * 86400,
        clock: Clock = time.time,
        recent_keys: int = RECENT_KEYS,
        mid_keys: int = MID_KEYS,
        slice_keys: int = SLICE_KEYS,
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
        # The last few `seen` key lists and their blobs, by id (`_blob`).
        self._blobs: dict[int, tuple[Sequence[bytes], bytes]] = {}
        # The slices of the tables of slices no merge appends to any more (`_slices_in`).
        self._sliced: dict[str, int] = {}

    def _blob(self, keys: Sequence[bytes], last: bool = False) -> bytes:
        """`_key_blob(keys)`, its lengths checked once a batch: a claim's keys are mostly the
        very list `seen` was asked for its batch (the worker's keys of the batch), so a list
        that still joins to the blob made for it then is not checked again (the check is
        ~5x the join: ~0.1 µs a key of the event loop). `last`: the batch's claim, its entry
        is dropped."""
        if _KEY_BLOB is not None and type(keys) is list:
            return _KEY_BLOB(keys)  # type: ignore[no-any-return]  # as cheap as the cache's join
        hit = self._blobs.pop(id(keys), None) if last else self._blobs.get(id(keys))
        if hit is not None and hit[0] is keys:
            blob = b"".join(keys)
            if blob == hit[1] and len(keys) * 32 == len(blob):
                return blob
        blob = _key_blob(keys)
        if not last:
            self._blobs[id(keys)] = (keys, blob)
            if len(self._blobs) > _BLOBS:
                del self._blobs[next(iter(self._blobs))]
        return blob

    def _live(self, tables: Sequence[tuple[int, str]], now: float) -> list[str]:
        """Tables that may hold unexpired keys, newest first."""
        return [name for day, name in tables if (day + 1) * DAY + self._ttl > now]

    async def seen(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        blob = self._blob(keys)
        now = self._clock()
        since = now - self._ttl

        def lookup(c: sqlite3.Connection) -> list[int]:
            self._catch_up(c, now)
            maybe = self._filter.maybe_rows(blob)
            if not maybe:
                return []
            # each key the filter may hold: the log rows of the filters that may hold it
            where: dict[int, list[tuple[int, int] | None]] = {}
            for rows, left in maybe:
                for i in left:
                    where.setdefault(i, []).append(rows)
            hits: list[int] = []
            rest: dict[int, list[tuple[int, int] | None]] = {}
            for i, rows_of in where.items():
                key = blob[i * 32 : i * 32 + 32]
                # the unmerged rows its filters hold (the newest filter's, mostly: an older
                # filter's false positive then builds no row's key set)
                if any(
                    row.at > since and _among(id_, rows_of) and row.has(key)
                    for id_, row in self._pending.items()
                ):
                    hits.append(i)
                else:
                    rest[i] = rows_of
            if not rest:
                return hits
            # only the keys the filter may hold are looked up: in `idem_mid` and the runs
            # their filters' log rows went to (every run for a filter built from the tables)
            live = self._live(idem_tables(c), now)
            groups: dict[tuple[str, ...], list[int]] = {}
            for i, rows_of in rest.items():
                groups.setdefault(_runs_of(live, rows_of), []).append(i)
            newest = max((t for t in live if _sliced(t)), key=_first, default=None)
            for tables, keys in groups.items():
                terms = [_exists(t, self._slices_in(c, t, newest)) for t in (IDEM_MID, *tables)]
                hits += _probe(c, blob, keys, terms, since)
            return hits

        hits = await self._db.call("idempotency", lambda c: _again_if_dropped(c, _read(lookup)))
        found = [False] * len(keys)
        for i in hits:
            found[i] = True
        return found

    def _slices_in(self, c: sqlite3.Connection, table: str, newest: str | None) -> int | None:
        """The slices in `table` (None: not a table of slices), inside the read transaction
        that listed the live tables, `newest` the newest table of slices among them: counted
        every time there (merges append to it), once in any other (none will)."""
        if not _sliced(table):
            return None
        n = self._sliced.get(table)
        if n is None:
            (top,) = c.execute(f"SELECT max(slice) FROM {table}").fetchone()
            n = 0 if top is None else top + 1
            if table != newest:
                if len(self._sliced) >= 1 << 16:  # the dropped tables' go too
                    self._sliced.clear()
                self._sliced[table] = n
        return n

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
                self._filter.add(keys, claimed_at, id_)
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
            built.add(keys, claimed_at, id_)
            pending[id_] = _Unmerged(claimed_at, keys)
        self._filter, self._logged, self._pending = built, logged, pending

    async def claim(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        blob = self._blob(keys, last=True)
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
            # in a transaction of its own, not the merge's: each holds the writer lock for
            # about as long (a table of slices dropped: ~25 ms of CPU)
            if self._next_drop is None or now >= self._next_drop:
                with immediate(c):
                    self._drop_expired(c, now)

        await self._db.call("idempotency", write)

    def _merge(self, c: sqlite3.Connection, now: float) -> None:
        """Move the log's oldest unmerged rows, up to `slice_keys` keys (if `recent_keys`
        wait: another process may have merged them meanwhile), sorted, into `idem_mid`, and
        mark them merged; rename
        `idem_mid` to a run once `mid_keys` were moved into it (a slice of `mid_keys` or
        more into an empty `idem_mid` is written as its run at once); prune the merged rows older
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
            last = rows[-1][0]
            moved = sum(len(keys) // 32 for _, keys in live)
            if live and moved >= self._mid_keys and _mid_empty(c, mid_keys):
                # the slice alone is a run (MID_KEYS): written as that run, a new table, not
                # moved into the empty `idem_mid` then renamed (an ALTER TABLE, which reads
                # the whole schema again, and a CREATE more); in the keys' own order: into a
                # table this small, all of whose pages this transaction holds, SQLite's sort
                # of 25,000 keys cost more (~20 ms) than it saved the inserts (~13 ms), and
                # the table takes as many pages (docs/benchmarks.md, emidem)
                run, ordinal = _slice_table(c, int(max(at for at, _ in live) // DAY), last)
                for i in range(0, len(live), _MERGE_ROWS):
                    _insert_sorted(c, live[i : i + _MERGE_ROWS], run, ordered=False, at=ordinal)
                live = []
            for i in range(0, len(live), _MERGE_ROWS):
                _insert_sorted(c, live[i : i + _MERGE_ROWS])
            if live:
                mid_keys += moved
                mid_newest = max(mid_newest, max(at for at, _ in live))
            if mid_keys >= self._mid_keys:
                # a slice of its own: copied, not renamed (no schema change)
                run, ordinal = _slice_table(c, int(mid_newest // DAY), last)
                c.execute(
                    f"INSERT INTO {run} (slice, key, claimed_at) SELECT ?, key, claimed_at"
                    f" FROM {IDEM_MID}",
                    (ordinal,),
                )
                c.execute(f"DELETE FROM {IDEM_MID}")
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
        self._unmerged = waiting - taken

    def _drop_expired(self, c: sqlite3.Connection, now: float) -> None:
        """Inside a write transaction: drop the tables whose newest key expired, the oldest
        first, one table of slices or up to GROUP_SLICES runs a transaction (a day's runs
        dropped at once held the writer lock for all of them: ~1,400 at 10,000 runs, each
        DROP a scan of the schema); look again at the next claim if more expired, else when
        the oldest left expires, or a day from now (a table made meanwhile)."""
        tables = idem_tables(c)
        live = set(self._live(tables, now))
        expired = [name for _, name in reversed(tables) if name not in live]
        budget = GROUP_SLICES
        while expired and (cost := GROUP_SLICES if _sliced(expired[0]) else 1) <= budget:
            c.execute(f"DROP TABLE {expired.pop(0)}")
            budget -= cost
        kept = [(day + 1) * DAY + self._ttl for day, name in tables if name in live]
        self._next_drop = now if expired else min([now + DAY, *kept])

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


# Tables one `seen` statement probes at most: its probes are one OR chain, and SQLite refuses
# an expression deeper than 1,000 ("Expression tree is too large"), which a filter built from
# the tables (every live run) reached at 999 runs (~25M keys): every `seen` of a key it may
# hold then failed (docs/benchmarks.md, idemscale).
_PROBE_TABLES = 400


def _exists(table: str, slices: int | None = None) -> str:
    """The probe of one table for key `substr(?1, i, 32)` claimed after ?2; in a table of
    `slices` slices (None: a table of keys alone), one B-tree search a slice."""
    where = "" if slices is None else f"slice IN ({', '.join(map(str, range(slices)))}) AND "
    return (
        f"EXISTS (SELECT 1 FROM {table} WHERE {where}key = substr(?1, i, 32) AND claimed_at > ?2)"
    )


def _probe(
    c: sqlite3.Connection, blob: bytes, keys: list[int], terms: Sequence[str], since: float
) -> list[int]:
    """Which of keys `keys` (indexes into `blob`) an unexpired row of the tables holds, one
    probe (`_exists`) a table: one statement a _PROBE_TABLES tables, each asked only for
    the keys not found before."""
    hits: list[int] = []
    for at in range(0, len(terms), _PROBE_TABLES):
        if not keys:
            break
        few = b"".join(blob[i * 32 : i * 32 + 32] for i in keys)
        probe = " OR ".join(terms[at : at + _PROBE_TABLES])
        sql = f"{_KEYS} SELECT group_concat(i) FROM k WHERE {probe}"
        found: str | None = c.execute(sql, (few, since)).fetchone()[0]
        if found:
            now_hit = {keys[(int(i) - 1) // 32] for i in found.split(",")}
            hits += sorted(now_hit)
            keys = [i for i in keys if i not in now_hit]
    return hits


def _among(row: int, rows_of: Sequence[tuple[int, int] | None]) -> bool:
    """Whether log row `row` is among the rows of any of these filters (`_Bloom.rows`)."""
    return any(rows is None or rows[0] <= row <= rows[1] for rows in rows_of)


def _first(table: str) -> int:
    """The run number of a table of keys (`_table_day`): a table of slices' first slice's."""
    found = _table_day(table)
    return 0 if found is None else found[1]


def _runs_of(live: Sequence[str], rows_of: Sequence[tuple[int, int] | None]) -> tuple[str, ...]:
    """The live tables (`live`, newest first) that may hold a key the filters of these log
    rows (`_Bloom.rows`) may hold: a run `idem_YYYYMMDD_L` of older code holds the keys of
    the log rows after the run before it (by L) through L; a table of slices
    `idem_sYYYYMMDD_F`, the rows after the table of slices before it (by F: the slice before
    its first was merged after that table's first) and before the next one's F (merges append
    only to the newest). So only the tables whose rows meet a filter's; every table for a
    filter built from the tables (None), and always the day tables of the code before the
    runs. A key's filters hold ~4M keys, ~17 runs of 250,000, where its `seen` probed every
    run (~80 at bench_steady's end), and the filters' false positives grow with the
    filters: the probes grew as filters x runs (docs/benchmarks.md)."""
    if any(rows is None for rows in rows_of):
        return tuple(live)
    numbered = sorted((_first(name), name) for name in live if _table_day(name) is not None)
    firsts = [n for n, name in numbered if _sliced(name)]
    out: list[str] = []
    before = -1  # the run before the oldest live one is gone: its rows unknown
    prior = -1  # the same for the tables of slices
    for last, name in numbered:
        if last == 0:  # a day table of the code before the runs
            out.append(name)
            continue
        low, high = before, last
        if _sliced(name):
            after = bisect.bisect_right(firsts, last)
            low, high = prior, firsts[after] - 1 if after < len(firsts) else sys.maxsize
            prior = last
        else:
            before = last
        if any(rows is not None and high >= rows[0] and low < rows[1] for rows in rows_of):
            out.append(name)
    order = {name: i for i, name in enumerate(live)}
    return tuple(sorted(out, key=order.__getitem__))


def _insert_sorted(
    c: sqlite3.Connection,
    rows: Sequence[tuple[float, bytes]],
    table: str = IDEM_MID,
    ordered: bool = True,
    at: int | None = None,
) -> None:
    """Insert the keys of log rows (claim time, keys) into `table` in key order (`ordered`;
    else in the rows' order: a new slice, `_merge`), as slice `at` of a table of slices
    (None: a table of keys alone), with
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
    into, upsert = "(key, claimed_at) SELECT", _UPSERT
    if at is not None:
        into, upsert = f"(slice, key, claimed_at) SELECT {int(at)},", _SLICE_UPSERT
    c.execute(
        f"WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 32 FROM k WHERE i + 32 < ?"
        f"{2 * len(rows) + 1}) INSERT INTO {table} {into} key, at"
        f" FROM ({terms}) WHERE true{' ORDER BY key' if ordered else ''}{upsert}",
        [*(x for t, keys in rows for x in (keys, t)), longest],
    )


_SLICE_UPSERT = _UPSERT.replace("(key)", "(slice, key)")


def _slice_table(c: sqlite3.Connection, day: int, last: int) -> tuple[str, int]:
    """Inside the merge's transaction: the table of slices and the ordinal for the slice of
    log rows through `last` whose newest key is of day `day`: the next in the newest table
    of slices (the greatest F) if that one expires with or after it and holds fewer than
    GROUP_SLICES; else slice 0 of a new table (a schema change: every GROUP_SLICES merges)."""
    sliced = [(_first(n), d, n) for d, n in idem_tables(c) if _sliced(n)]
    if sliced:
        _, newest_day, newest = max(sliced)
        if day <= newest_day:
            (top,) = c.execute(f"SELECT max(slice) FROM {newest}").fetchone()
            if top is None or top + 1 < GROUP_SLICES:
                return newest, 0 if top is None else top + 1
    table = idem_slices(day, last)
    c.execute(_SLICES_DDL.format(table))
    return table, 0


def _mid_empty(c: sqlite3.Connection, mid_keys: int) -> bool:
    """Whether `idem_mid` holds no key: none moved into it since its last rename (`mid_keys`)
    and none put there otherwise (`_copy_state_keys` copies an older state file's keys into
    it without counting them: those go with its next rename, not left there for good)."""
    return (
        mid_keys == 0 and not c.execute(f"SELECT EXISTS (SELECT 1 FROM {IDEM_MID})").fetchone()[0]
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
