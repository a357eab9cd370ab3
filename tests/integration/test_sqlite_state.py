"""The embedded state stores on a real SQLite file: checkpoints, idempotency, DLQ, drops, intake."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.records import DLQEntry, ReasonCode
from ingest.state.base import DLQFilter
from ingest.state.sqlite import (
    DAY,
    MIGRATIONS,
    SQLiteCheckpointStore,
    SQLiteDB,
    SQLiteDLQStore,
    SQLiteDroppedStore,
    _write,
    fetchall,
    fetchone,
    idem_table,
    immediate,
)
from ingest.state.sqlite_idem import (
    IDEM_MIGRATIONS,
    LOG_KEEP,
    RECENT_KEYS,
    SLICE_KEYS,
    SQLiteIdempotencyStore,
    _Bloom,
    _copy_state_keys,
    _key_blob,
    _state_keys,
    idem_day,
    idem_path,
    open_idempotency_db,
)
from ingest.webhook.sqlite import SQLiteIntake
from tests.integration.conftest import dlq_entry

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SQLiteDB]:
    database = await SQLiteDB.open(tmp_path / "state" / "state.db")
    yield database
    await database.close()


def entry(n: int, *, at: float = T0, **kw: Any) -> DLQEntry:
    kw = {"source": "inbox", "sink": "sqlite", "entity": ("customer", f"c-{n}"), **kw}
    return dlq_entry(n, at=datetime.fromtimestamp(at, UTC), **kw)


# ------------------------------------------------------------------------------ SQLiteDB


async def test_open_applies_every_migration_once(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.db"
    first = await SQLiteDB.open(path)
    await first.close()
    again = await SQLiteDB.open(path)  # reopening must not re-run migrations
    versions = await again.run(
        lambda c: [v for (v,) in c.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    )
    mode = await again.run(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    await again.close()
    assert versions == sorted(m.version for m in MIGRATIONS)
    assert mode == "wal"


async def test_run_uses_one_dedicated_thread(db: SQLiteDB) -> None:
    import threading

    names = await asyncio.gather(*(db.run(lambda _c: threading.get_ident()) for _ in range(20)))
    assert len(set(names)) == 1
    assert names[0] != threading.get_ident()


# ------------------------------------------------------------------ the writer lock (flock)


def _hold_write(entered: threading.Event, release: threading.Event) -> Any:
    """A `run` callable: a write transaction that stays open until `release` is set."""

    def fn(c: sqlite3.Connection) -> None:
        with immediate(c):
            c.execute("INSERT INTO checkpoints VALUES ('held', 'x')")
            entered.set()
            assert release.wait(30)

    return fn


async def test_a_writer_waits_for_another_on_the_writer_lock_not_in_sqlites(
    tmp_path: Path,
) -> None:
    """While one connection holds a write transaction, another connection's write waits on
    the file's writer lock and goes in once the first commits, even with SQLite's own
    busy handler off (`busy_timeout = 0`): before the lock it failed at once with
    "database is locked" (with the busy handler on, it slept 1, 2, 5 ... 100 ms at a time)."""
    path = tmp_path / "state.db"
    first, second = await SQLiteDB.open(path), await SQLiteDB.open(path)
    entered, release = threading.Event(), threading.Event()
    try:
        await second.run(lambda c: c.execute("PRAGMA busy_timeout = 0"))
        holding = asyncio.ensure_future(first.run(_hold_write(entered, release)))
        assert await asyncio.to_thread(entered.wait, 30)
        writing = asyncio.ensure_future(
            second.run(lambda c: _write(c, "INSERT INTO checkpoints VALUES ('next', 'y')"))
        )
        await asyncio.sleep(0.3)
        assert not writing.done()  # waiting for the first to commit
        release.set()
        await holding
        assert await writing == 1
        rows = await second.run(fetchall("SELECT key FROM checkpoints ORDER BY key"))
        assert rows == [("held",), ("next",)]
    finally:
        release.set()
        await first.close()
        await second.close()


def _state_file_writes(db: SQLiteDB) -> dict[str, Any]:
    """Every write of state.db that the control plane makes (webhook door, auth, admin API)."""
    from ingest.auth.seen import SQLiteSeen
    from ingest.replay.plans import Plan, PlanSource, SQLitePlanStore
    from ingest.state.audit import OK, AuditEntry, SQLiteAuditStore

    seen = SQLiteSeen(db, clock=lambda: 100.0)
    plan = Plan(id="rp-0000abcd", tenant="acme-corp", start=0.0, end=10.0,
                sources=[PlanSource("inbox", "inbox", estimate_records=1)],
                throttle=1.0, created_at=1.0, created_by="alice")  # fmt: skip
    return {
        "intake append": lambda: SQLiteIntake(db).append("acme-corp", "hooks", [b"{}"], 1.0),
        "seen reserve": lambda: seen.reserve(b"k" * 32, 200.0),
        "seen release": lambda: seen.release(b"k" * 32),
        "audit record": lambda: SQLiteAuditStore(db).record(
            AuditEntry(1.0, "alice", "token", "admin.drain", OK)
        ),
        "plan save": lambda: SQLitePlanStore(db).save(plan),
    }


@pytest.mark.parametrize(
    "write", ["intake append", "seen reserve", "seen release", "audit record", "plan save"]
)
async def test_every_state_file_write_waits_on_the_writer_lock(tmp_path: Path, write: str) -> None:
    """The control plane's writes of state.db (the webhook door's intake append and
    signature reserve, audit, replay plans) take the file's writer lock like the workers'.
    Before, they were bare autocommit statements: they met SQLite's lock held and slept in
    its busy handler (up to 100 ms a time) while the workers, polling the writer lock within
    1 ms, kept winning it. With the busy handler off the old code fails at once with
    "database is locked"."""
    path = tmp_path / "state.db"
    holder, door = await SQLiteDB.open(path), await SQLiteDB.open(path)
    entered, release = threading.Event(), threading.Event()
    try:
        await door.run(lambda c: c.execute("PRAGMA busy_timeout = 0"))
        holding = asyncio.ensure_future(holder.run(_hold_write(entered, release)))
        assert await asyncio.to_thread(entered.wait, 30)
        writing = asyncio.ensure_future(_state_file_writes(door)[write]())
        await asyncio.sleep(0.3)
        assert not writing.done()  # waiting on the writer lock, not failed
        release.set()
        await holding
        await writing
    finally:
        release.set()
        await holder.close()
        await door.close()


@settings(max_examples=15, deadline=None)
@given(
    plans=st.lists(
        st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=12),
        min_size=2,
        max_size=4,
    )
)
def test_writer_lock_property_concurrent_writers_never_meet_a_busy_file(
    plans: list[list[int]],
) -> None:
    """Property: any number of connections of one file, each running its own sequence of
    write transactions (a counter bumped, the transaction held open 0-3 ms), at once and
    with SQLite's busy handler off: every transaction commits (none meets "database is
    locked": the writer lock orders them) and the counter is exact."""

    async def check() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "state.db"
            dbs = [await SQLiteDB.open(path) for _ in plans]
            try:
                for db in dbs:
                    await db.run(lambda c: c.execute("PRAGMA busy_timeout = 0"))
                await dbs[0].run(lambda c: _write(c, "INSERT INTO checkpoints VALUES ('n', 0)"))

                def bump(hold: int) -> Any:
                    def fn(c: sqlite3.Connection) -> None:
                        with immediate(c):
                            c.execute("UPDATE checkpoints SET value = value + 1 WHERE key = 'n'")
                            time.sleep(hold / 1000)

                    return fn

                async def writer(db: SQLiteDB, plan: list[int]) -> None:
                    for hold in plan:
                        await db.run(bump(hold))

                await asyncio.gather(
                    *(writer(db, plan) for db, plan in zip(dbs, plans, strict=True))
                )
                (value,) = await dbs[0].run(fetchone("SELECT value FROM checkpoints"))
                assert int(value) == sum(len(p) for p in plans)
            finally:
                for db in dbs:
                    await db.close()

    asyncio.run(check())


def _open_at(path: str, start: float, results: Any) -> None:
    """Open `path` (the keys file's migrations) at `start`; put "ok" or the error."""
    while time.time() < start:
        pass

    async def go() -> None:
        db = await SQLiteDB.open(Path(path), IDEM_MIGRATIONS)
        await db.close()

    try:
        asyncio.run(go())
        results.put("ok")
    except Exception as exc:  # the answer is what the test checks
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_creating_one_file_at_once_all_open_it(tmp_path: Path) -> None:
    """Found by the image test: the pod's two workers created state.idem.db at the same
    instant and one died at start with "database is locked" (a new file's switch to WAL takes
    an exclusive lock SQLite does not wait for). 4 processes x 40 fresh files, all must open.
    The race is narrow: the same shape in a script failed 1 round of 20 on the old code, 0 of
    100 on the new; this test does not fail on every run of the old code."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    failed: list[str] = []
    for round_ in range(40):
        results = ctx.Queue()
        start = time.time() + 0.3
        path = str(tmp_path / f"r{round_}.db")
        procs = [ctx.Process(target=_open_at, args=(path, start, results)) for _ in range(8)]
        for proc in procs:
            proc.start()
        answers = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        failed += [a for a in answers if a != "ok"]
    assert not failed, failed[:3]


async def test_without_the_writer_lock_sqlite_alone_orders_the_writers(tmp_path: Path) -> None:
    """The lock file cannot be opened (here: a directory of that name), or another holder
    keeps the lock longer than the writer waits for it: writes still go in, ordered by
    SQLite's own lock and busy handler, as before the writer lock."""
    (tmp_path / "a.db-lock").mkdir()
    db = await SQLiteDB.open(tmp_path / "a.db")
    try:
        assert await db.run(lambda c: getattr(c, "writer", "?")) is None
        assert await db.run(lambda c: _write(c, "INSERT INTO checkpoints VALUES ('a', 1)")) == 1
    finally:
        await db.close()
    db = await SQLiteDB.open(tmp_path / "b.db")
    lock = os.open(tmp_path / "b.db-lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held by someone else, never released
        await db.run(lambda c: setattr(c, "writer_timeout", 0.2))
        assert await db.run(lambda c: _write(c, "INSERT INTO checkpoints VALUES ('b', 1)")) == 1
    finally:
        os.close(lock)
        await db.close()


# ---------------------------------------------------------------------------- checkpoints


async def test_checkpoint_round_trip_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = await SQLiteDB.open(path)
    store = SQLiteCheckpointStore(db, worker="w-1")
    assert await store.load("acme", "inbox") is None
    await store.save("acme", "inbox", {"file": "a.jsonl", "offset": 10})
    await store.save("acme", "inbox", {"file": "a.jsonl", "offset": 42})
    await store.save("other", "webhook", {"intake_id": 7})
    await db.close()

    db = await SQLiteDB.open(path)
    store = SQLiteCheckpointStore(db, worker="w-2")
    assert await store.load("acme", "inbox") == {"file": "a.jsonl", "offset": 42}
    listed = await store.list()
    assert set(listed) == {"checkpoint:acme:inbox", "checkpoint:other:webhook"}
    value = listed["checkpoint:acme:inbox"]
    assert value["worker"] == "w-1"
    assert datetime.fromisoformat(value["updated_at"]).tzinfo is not None
    await store.delete("acme", "inbox")
    assert await store.load("acme", "inbox") is None
    assert await store.load("other", "webhook") == {"intake_id": 7}
    await db.close()


# ---------------------------------------------------------------------------- idempotency


async def test_idempotency_seen_claim_and_ttl(db: SQLiteDB) -> None:
    clock = FakeClock()
    store = SQLiteIdempotencyStore(db, ttl_seconds=100, clock=clock)
    a, b, c = (bytes([i]) * 32 for i in range(3))
    assert await store.seen([a, b]) == [False, False]
    await store.claim([a, b])
    assert await store.seen([a, c, b, a]) == [True, False, True, True]
    clock.now += 60
    await store.claim([b])  # a re-claim refreshes the TTL
    clock.now += 50  # a: 110 s old (expired); b: 50 s old
    assert await store.seen([a, b]) == [False, True]
    stats = await store.stats()
    assert stats["backend"] == "sqlite"
    assert stats["keys"] == 1
    assert stats["memory_bytes"] is None
    assert stats["oldest_bucket"] == datetime.fromtimestamp(T0 + 60, UTC).date().isoformat()


async def _day_tables(db: SQLiteDB) -> list[str]:
    """The tables of slices, runs and day tables, by name."""
    return await db.run(
        lambda c: [n for (n,) in c.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND (name GLOB 'idem_[0-9]*' OR name GLOB 'idem_s[0-9]*') ORDER BY name")]
    )  # fmt: skip


async def _days(db: SQLiteDB) -> list[int | None]:
    """The days of the runs and day tables, one a table, in name order."""
    return [idem_day(n) for n in await _day_tables(db)]


async def test_idempotency_keys_expire_by_run(db: SQLiteDB) -> None:
    """Each merge makes a slice here (`mid_keys` 1), in a table of slices named by the day of
    its newest key (a later day's slice starts a new table); a table is dropped by the first
    claim after its newest key expired."""
    day = int(T0 // DAY)
    clock = FakeClock(day * DAY + DAY - 1800)  # 23:30 UTC
    store = SQLiteIdempotencyStore(db, ttl_seconds=3600, clock=clock, recent_keys=1, mid_keys=1)
    old, new = b"o" * 32, b"n" * 32
    await store.claim([old])
    clock.now += 2400  # 00:10 the next day: a second run
    await store.claim([new])
    assert await _days(db) == [day, day + 1]
    assert await store.seen([old, new]) == [True, True]
    clock.now += 1201  # old is 3601 s old: expired to the second, its run still there
    assert await store.seen([old, new]) == [False, True]
    assert (await store.stats())["keys"] == 1
    clock.now = (day + 1) * DAY + 3600  # every key of day `day` expired: its run goes
    await store.claim([new])
    assert await _days(db) == [day + 1]  # the day's second slice in its table
    assert await store.seen([old, new]) == [False, True]


async def _keys_of(db: SQLiteDB, table: str) -> list[bytes]:
    return await db.run(
        lambda c: [k for (k,) in c.execute(f"SELECT key FROM {table} ORDER BY key")]
    )


async def _log_keys(db: SQLiteDB) -> int:
    """Keys in the log's unmerged rows."""
    return await db.run(
        lambda c: c.execute(
            "SELECT COALESCE(sum(length(keys)), 0) / 32 FROM idem_log"
            " WHERE id > (SELECT through FROM idem_log_merged)"
        ).fetchone()[0]
    )


async def test_idempotency_claims_wait_in_the_log_then_move_to_idem_mid_then_a_run(
    db: SQLiteDB,
) -> None:
    """Claims go to the log alone; once `recent_keys` wait there, a claim moves them all to
    `idem_mid`; once `mid_keys` were moved there, it becomes a run and a new `idem_mid`
    starts; a key is seen wherever it is; a store opened afresh on the file (a restart)
    counts what waits and merges on."""
    clock = FakeClock()
    store = SQLiteIdempotencyStore(db, clock=clock, recent_keys=3, mid_keys=5)
    k = [bytes([i * 32]) * 32 for i in range(8)]

    async def where() -> tuple[int, list[bytes], list[str]]:
        return await _log_keys(db), await _keys_of(db, "idem_mid"), await _day_tables(db)

    await store.claim([k[7]])
    await store.claim([k[1]])
    assert await where() == (2, [], [])
    assert await store.seen(k) == [False, True] + [False] * 5 + [True]  # from the log
    await store.claim([k[2]])  # 3 keys wait: merged
    assert await where() == (0, [k[1], k[2], k[7]], [])
    await store.claim([k[3], k[4]])
    assert await where() == (2, [k[1], k[2], k[7]], [])
    restarted = SQLiteIdempotencyStore(db, clock=clock, recent_keys=3, mid_keys=5)
    await restarted.claim([k[0]])  # 3 wait: merged, 6 moved into idem_mid: a run
    mid, run = await where(), await _day_tables(db)
    assert mid[:2] == (0, []) and len(run) == 1
    assert await _keys_of(db, run[0]) == [k[0], k[1], k[2], k[3], k[4], k[7]]
    assert await store.seen(k) == [True] * 5 + [False, False, True]
    assert await restarted.seen(k) == [True] * 5 + [False, False, True]
    assert (await restarted.stats())["keys"] == 6


async def test_idempotency_each_merge_writes_its_slice_as_a_run_of_its_own(db: SQLiteDB) -> None:
    """By default a merge's slice is a run of its own (`mid_keys` = `slice_keys`), written
    as that run: no statement inserts into `idem_mid` or renames it, each of which wrote
    the slice's pages once more, and none sorts the keys first (dearer than it saves in a
    new table). Every key stays seen."""
    store = SQLiteIdempotencyStore(db)
    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(RECENT_KEYS)]
    statements: list[str] = []
    await db.run(lambda c: c.set_trace_callback(statements.append))
    try:
        for i in range(0, len(keys), 5000):
            await store.claim(keys[i : i + 5000])
    finally:
        await db.run(lambda c: c.set_trace_callback(None))
    runs = await _day_tables(db)  # RECENT_KEYS waited: one merge moved the oldest slice
    assert len(runs) == 1 and len(await _keys_of(db, runs[0])) == SLICE_KEYS
    assert await _keys_of(db, "idem_mid") == []
    assert await _log_keys(db) == RECENT_KEYS - SLICE_KEYS
    assert not [s for s in statements if "ALTER TABLE" in s or "INTO idem_mid" in s]
    moves = [s for s in statements if f"INSERT INTO {runs[0]}" in s]
    assert len(moves) == 1 and "ORDER BY" not in moves[0]
    assert await store.seen([*keys[:: RECENT_KEYS // 10], b"x" * 32]) == [True] * 10 + [False]


async def test_idempotency_keys_put_in_idem_mid_uncounted_go_with_its_next_rename(
    db: SQLiteDB,
) -> None:
    """Keys in `idem_mid` that no merge counted (an older state file's, copied by
    `_copy_state_keys`) keep a merge off the run-of-its-own path: its slice joins them and
    `idem_mid` becomes a run, so they expire with it instead of staying for good."""
    clock = FakeClock()
    old = b"o" * 32
    await db.run(lambda c: c.execute("INSERT INTO idem_mid VALUES (?, ?)", (old, clock.now)))
    store = SQLiteIdempotencyStore(db, clock=clock, recent_keys=2, mid_keys=2, slice_keys=2)
    k = [bytes([i + 1]) * 32 for i in range(2)]
    await store.claim([k[0]])
    await store.claim([k[1]])  # 2 wait: merged with `old` into idem_mid, renamed to a run
    runs = await _day_tables(db)
    assert len(runs) == 1 and await _keys_of(db, runs[0]) == sorted([old, *k])
    assert await _keys_of(db, "idem_mid") == []
    assert await store.seen([old, *k]) == [True, True, True]


async def test_idempotency_a_batch_s_keys_are_checked_once_for_seen_and_claim(
    db: SQLiteDB,
) -> None:
    """A claim of the very list `seen` was asked reuses its blob (the 32-byte check runs
    once a batch); a list changed in between, or another list, is joined and checked
    afresh, and its own keys are claimed. (The Python twin's cache: the compiled `key_blob`,
    where built, checks and joins in one pass each time, tests/unit/test_native_key_blob.py.)"""
    store = SQLiteIdempotencyStore(db)
    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(100)]
    with (
        mock.patch("ingest.state.sqlite_idem._KEY_BLOB", None),
        mock.patch("ingest.state.sqlite_idem._key_blob", wraps=_key_blob) as check,
    ):
        assert await store.seen(keys) == [False] * 100
        await store.claim(keys)
        assert check.call_count == 1
        other = [hashlib.sha256(b"other %d" % i).digest() for i in range(3)]
        assert await store.seen(other) == [False] * 3
        other[1] = hashlib.sha256(b"changed").digest()  # after seen, before the claim
        await store.claim(other)
        assert check.call_count == 3
        with pytest.raises(ValueError):
            await store.claim([*keys[:2], b"short"])
    assert await store.seen(keys) == [True] * 100
    changed = [hashlib.sha256(b"other %d" % i).digest() for i in range(3)]
    assert await store.seen([*other, changed[1]]) == [True, True, True, False]


async def test_idempotency_a_merge_moves_one_slice_of_the_oldest_rows(db: SQLiteDB) -> None:
    """Once `recent_keys` wait, a claim merges only the oldest rows holding `slice_keys`
    keys (the next claims move the rest): no transaction holds the writer lock for the
    whole backlog. Every key stays seen wherever it is."""
    clock = FakeClock()
    store = SQLiteIdempotencyStore(db, clock=clock, recent_keys=4, mid_keys=100, slice_keys=2)
    k = [bytes([i * 16]) * 32 for i in range(8)]
    for key in k[:3]:
        await store.claim([key])
    assert await _log_keys(db) == 3
    await store.claim([k[3]])  # 4 wait: the two oldest rows move
    assert await _log_keys(db) == 2
    assert await _keys_of(db, "idem_mid") == [k[0], k[1]]
    await store.claim([k[4]])  # 3 wait: nothing moves
    assert await _log_keys(db) == 3
    await store.claim([k[5], k[6]])  # 5 wait: k[2] and k[3] (two keys) move
    assert await _log_keys(db) == 3
    assert await _keys_of(db, "idem_mid") == [k[0], k[1], k[2], k[3]]
    assert await store.seen(k) == [True] * 7 + [False]
    restarted = SQLiteIdempotencyStore(db, clock=clock, recent_keys=3, slice_keys=1)
    await restarted.claim([k[7]])  # 4 wait (counted afresh): the oldest row alone moves
    assert await _log_keys(db) == 3
    assert await _keys_of(db, "idem_mid") == [k[0], k[1], k[2], k[3], k[4]]
    assert await restarted.seen(k) == [True] * 8


async def test_idempotency_a_run_spanning_midnight_goes_with_its_newest_key(
    db: SQLiteDB,
) -> None:
    """A run holds keys of two days: it is named by (and expires with) the newest's day, so
    the older day's keys in it are seen until their own TTL, then not, and the run is dropped
    only once the newest key expired too; keys expired before a merge are not carried on."""
    day = int(T0 // DAY)
    clock = FakeClock(day * DAY + DAY - 100)  # 100 s before midnight
    store = SQLiteIdempotencyStore(db, ttl_seconds=DAY, clock=clock, recent_keys=2, mid_keys=3)
    a, b, c, gone = (bytes([i]) * 32 for i in (1, 2, 3, 4))
    await store.claim([gone])
    clock.now += DAY  # `gone` expired, still in the log
    await store.claim([a])  # 2 wait: merged (without `gone`)
    assert await _keys_of(db, "idem_mid") == [a]
    await store.claim([b])
    clock.now += 200  # the next day
    await store.claim([c])  # merged: 3 in idem_mid: a run of day + 2
    (run,) = await _day_tables(db)
    assert idem_day(run) == day + 2
    assert await _keys_of(db, run) == [a, b, c]
    assert await store.seen([a, b, c, gone]) == [True, True, True, False]
    clock.now = (day + 2) * DAY - 100 + DAY + 1  # a and b expired, c not
    assert await store.seen([a, b, c, gone]) == [False, False, True, False]
    await store.claim([gone])
    assert await _day_tables(db) == [run]
    clock.now = (day + 3) * DAY + DAY  # c expired: the run goes
    await store.claim([gone])
    assert await _day_tables(db) == []
    assert await store.seen([a, b, c, gone]) == [False, False, False, True]


async def test_idempotency_adopts_the_one_table_layout_of_old_files(tmp_path: Path) -> None:
    """A state file the code before migration 12 made: its live keys stay claimed."""
    old = await SQLiteDB.open(tmp_path / "state.db", [m for m in MIGRATIONS if m.version < 12])
    now = time.time()
    live, expired, older = b"l" * 32, b"e" * 32, b"2" * 32
    rows = [(live, now - 60, now - 60 + 7 * DAY), (expired, now - 8 * DAY, now - DAY),
            (older, now - 2 * DAY, now + 5 * DAY)]  # fmt: skip
    await old.run(lambda c: c.executemany("INSERT INTO idem VALUES (?, ?, ?)", rows))
    await old.close()
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:
        store = SQLiteIdempotencyStore(db)
        assert await store.seen([live, expired, older, b"x" * 32]) == [True, False, True, False]
        tables = await db.run(lambda c: [n for (n,) in c.execute(
            "SELECT name FROM sqlite_master WHERE name LIKE 'idem%' ORDER BY name")])  # fmt: skip
        assert tables == [
            idem_table(int((now - 2 * DAY) // DAY)),
            idem_table(int((now - 60) // DAY)),
            "idem_log",
            "idem_log_merged",
            "idem_log_pruned",
            "idem_mid",
            "idem_recent",
        ]
        assert (await store.stats())["keys"] == 2
    finally:
        await db.close()


async def test_idempotency_files_before_idem_mid_keep_their_keys(tmp_path: Path) -> None:
    """A state file of the code before migration 14 (keys in `idem_recent` and a day's
    table): it opens, gets `idem_mid` (and `idem_recent`'s keys move there, migration 16),
    and every key stays seen through the merges."""
    old = await SQLiteDB.open(tmp_path / "state.db", [m for m in MIGRATIONS if m.version < 14])
    now = time.time()
    in_day, in_recent = b"d" * 32, b"r" * 32
    table = idem_table(int(now // DAY))
    await old.run(
        lambda c: c.execute(
            f"CREATE TABLE {table} (key BLOB PRIMARY KEY, claimed_at REAL NOT NULL) WITHOUT ROWID"
        )
    )
    await old.run(lambda c: c.execute(f"INSERT INTO {table} VALUES (?, ?)", (in_day, now - 60)))
    await old.run(lambda c: c.execute("INSERT INTO idem_recent VALUES (?, ?)", (in_recent, now)))
    await old.close()  # fmt: skip
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:
        assert await _keys_of(db, "idem_recent") == []
        store = SQLiteIdempotencyStore(db, recent_keys=1, mid_keys=2)
        both = [in_day, in_recent]
        assert await store.seen(both) == [True, True]
        for i in range(12):  # every level merged on into the next, more than once
            await store.claim([bytes([i]) * 32])
            assert await store.seen(both) == [True, True]
        assert await _keys_of(db, "idem_mid") != [in_recent]  # it moved on
        assert (await store.stats())["keys"] == 14
    finally:
        await db.close()


async def test_idempotency_keys_have_a_file_of_their_own(tmp_path: Path) -> None:
    """The service's SQLite stores: the keys go to `state.idem.db` beside `state.db`, whose
    own idempotency tables stay empty (its commits no longer queue behind claims)."""
    from ingest.config import parse_config
    from ingest.factory import open_stores

    stores = await open_stores(parse_config({"data_dir": str(tmp_path)}))
    try:
        await stores.idempotency.claim([_digest(1), _digest(2)])
        assert await stores.idempotency.seen([_digest(1), _digest(3)]) == [True, False]
    finally:
        await stores.close()
    idem = sqlite3.connect(tmp_path / "state.idem.db")
    state = sqlite3.connect(tmp_path / "state.db")
    try:
        count = "SELECT count(*) FROM idem_log"
        assert idem.execute(count).fetchone() == (1,)
        assert state.execute(count).fetchone() == (0,)
        assert state.execute("SELECT count(*) FROM idem_recent").fetchone() == (0,)
    finally:
        idem.close()
        state.close()


@settings(max_examples=12, deadline=None)
@given(
    old=st.lists(st.lists(st.integers(0, 400), min_size=1, max_size=12), max_size=10),
    new=st.lists(st.integers(0, 400), max_size=12),
    kill_between=st.booleans(),
)
def test_idempotency_keys_of_a_state_file_move_to_the_keys_file(
    old: list[list[int]], new: list[int], kill_between: bool
) -> None:
    """Property: a state file of the old layout (keys claimed in batches, spread over
    the log, `idem_mid` and two days' runs by small merge thresholds), and maybe
    keys already claimed in the keys' file: after `open_idempotency_db` every key claimed in
    either is seen, and none other; the state file holds no key any more. Also when the
    process died between the copy and the delete (`kill_between`: the copy alone, then a
    fresh open)."""

    async def check() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "state.db"
            clock = FakeClock(DAY * 20_000 + DAY - 50)
            state = await SQLiteDB.open(path)
            try:
                levels = dict(recent_keys=3, mid_keys=6)
                store = SQLiteIdempotencyStore(state, clock=clock, **levels)  # type: ignore[arg-type]
                for batch in old:
                    await store.claim([_digest(i) for i in batch])
                    clock.now += 10  # across midnight: two days' tables
                idem = await SQLiteDB.open(idem_path(path), IDEM_MIGRATIONS)
                await SQLiteIdempotencyStore(idem, clock=clock).claim([_digest(i) for i in new])
                if kill_between:
                    await idem.run(_copy_state_keys(path))
                await idem.close()
                idem = await open_idempotency_db(state)
                try:
                    moved = SQLiteIdempotencyStore(idem, clock=clock)
                    claimed = {i for batch in old for i in batch} | set(new)
                    everything = list(range(401))
                    found = await moved.seen([_digest(i) for i in everything])
                    assert found == [i in claimed for i in everything]
                finally:
                    await idem.close()
                assert not await state.run(_state_keys)
            finally:
                await state.close()

    asyncio.run(check())


def _digest(i: int) -> bytes:
    return hashlib.sha256(b"k%d" % i).digest()


async def test_idempotency_never_claimed_keys_are_answered_without_a_lookup(
    db: SQLiteDB,
) -> None:
    """seen() asks the in-memory filter first: a batch of keys never claimed costs no lookup
    in the tables (one read of the claims log); a claimed key still in the log is found in
    the process's copy of the log's unmerged rows, without a lookup either; one merged into
    `idem_mid` is looked up there and found."""
    store = SQLiteIdempotencyStore(db, clock=FakeClock(), recent_keys=2000)
    claimed = [_digest(i) for i in range(2000)]
    await store.claim(claimed)  # merged at once
    waiting = [_digest(i) for i in range(4000, 4010)]
    await store.claim(waiting)
    statements: list[str] = []
    await db.run(lambda c: c.set_trace_callback(statements.append))
    try:
        fresh = [_digest(i) for i in range(2000, 4000)]
        assert await store.seen(fresh) == [False] * 2000
        assert await store.seen(waiting[3:5]) == [True, True]
        assert not [s for s in statements if "EXISTS" in s]  # no lookup
        assert await store.seen([fresh[0], claimed[7]]) == [False, True]
        assert [s for s in statements if "EXISTS" in s]
    finally:
        await db.run(lambda c: c.set_trace_callback(None))


async def test_idempotency_sees_what_another_process_claimed_after_it_started(
    tmp_path: Path,
) -> None:
    """Two processes on one file: each one's filter learns the other's claims from the log,
    also once the log rows it had not read were pruned (it builds the filter again)."""
    clock = FakeClock()
    first = await SQLiteDB.open(tmp_path / "s.db")
    second = await SQLiteDB.open(tmp_path / "s.db")
    try:
        a = SQLiteIdempotencyStore(first, clock=clock, recent_keys=2)
        b = SQLiteIdempotencyStore(second, clock=clock, recent_keys=2)
        keys = [_digest(i) for i in range(6)]
        assert await a.seen(keys) == [False] * 6  # both filters built (empty)
        assert await b.seen(keys) == [False] * 6
        await a.claim(keys[:2])
        assert await b.seen(keys) == [True] * 2 + [False] * 4
        await b.claim(keys[2:3])
        assert await a.seen(keys) == [True] * 3 + [False] * 3
        clock.now += 2 * LOG_KEEP
        await a.claim(keys[3:4])
        await a.claim(keys[4:5])  # a merge starts: the log's old rows are pruned
        assert await second.run(lambda c: c.execute("SELECT through FROM idem_log_pruned")
                                .fetchone()[0]) > 0  # fmt: skip
        assert await b.seen(keys) == [True] * 5 + [False]
    finally:
        await first.close()
        await second.close()


_two = st.one_of(
    st.tuples(st.just("claim"), st.integers(0, 1), st.sets(st.integers(0, 30), max_size=5)),
    st.tuples(st.just("wait"), st.just(0), st.floats(min_value=0, max_value=2 * LOG_KEEP)),
    st.tuples(st.just("restart"), st.integers(0, 1), st.none()),
)


@settings(max_examples=40, deadline=None)
@given(
    actions=st.lists(_two, min_size=1, max_size=25),
    ttl=st.integers(min_value=1, max_value=4 * int(LOG_KEEP)),
    recent_keys=st.sampled_from([1, 3, 50_000]),
    slice_keys=st.sampled_from([1, 2, 12_500]),
)
def test_idempotency_property_two_processes(
    actions: list[tuple[str, int, Any]], ttl: int, recent_keys: int, slice_keys: int
) -> None:
    """Two processes claiming into one file (SHA-256 keys, so the filters answer "never
    claimed" for most), time passing beyond the log's keep and the TTL, restarts: after
    every step both see a key exactly while its latest claim, by either, is younger than
    the TTL."""
    two_processes(actions, ttl, recent_keys=recent_keys, mid_keys=4, slice_keys=slice_keys)


@settings(max_examples=60, deadline=None)
@given(
    actions=st.lists(_two, min_size=1, max_size=25),
    filter_keys=st.sampled_from([1, 3, 5]),
    mid_keys=st.sampled_from([1, 2, 4]),
    slice_keys=st.sampled_from([1, 3]),
    group_slices=st.sampled_from([1, 2, 3, 16]),
)
def test_idempotency_property_small_filters_many_runs(
    actions: list[tuple[str, int, Any]],
    filter_keys: int,
    mid_keys: int,
    slice_keys: int,
    group_slices: int,
) -> None:
    """As above with each Bloom filter holding a few keys (so a few log rows), a slice
    every few keys and a table of slices every `group_slices` slices (so a key's slice is one
    of many, in one table of many): `seen` probes a key only in the tables its filters' rows
    went to (`_runs_of`), and a wrong choice would answer "never claimed" for a claimed key.
    Fails on a mutant choosing by a filter's last row, and on one taking a table of slices
    to end at its first slice (as a run of older code)."""
    with (
        mock.patch.object(_Bloom, "KEYS", filter_keys),
        mock.patch("ingest.state.sqlite_idem.GROUP_SLICES", group_slices),
    ):
        two_processes(
            actions, int(3 * LOG_KEEP), recent_keys=1, mid_keys=mid_keys, slice_keys=slice_keys
        )


def two_processes(actions: list[tuple[str, int, Any]], ttl: int, **tuning: int) -> None:
    """Run `actions` (claims by either process, time passing, restarts) against two stores
    on one file, `tuning` their settings, checking both stores' `seen` after every step."""

    async def check() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            clock = FakeClock()
            dbs = [await SQLiteDB.open(Path(tmp) / "s.db") for _ in range(2)]

            def new_store(i: int) -> SQLiteIdempotencyStore:
                return SQLiteIdempotencyStore(dbs[i], ttl_seconds=ttl, clock=clock, **tuning)

            stores = [new_store(0), new_store(1)]
            everything = [_digest(i) for i in range(31)]
            latest: dict[bytes, float] = {}
            try:
                for what, who, arg in actions:
                    if what == "claim" and arg:
                        keys = [everything[i] for i in sorted(arg)]
                        await stores[who].claim(keys)
                        latest.update((k, clock.now) for k in keys)
                    elif what == "wait":
                        clock.now += arg
                    elif what == "restart":
                        stores[who] = new_store(who)
                    expect = [k in latest and clock.now - latest[k] < ttl for k in everything]
                    for store in stores:
                        assert await store.seen(everything) == expect
            finally:
                for d in dbs:
                    await d.close()

    asyncio.run(check())


_action = st.one_of(
    st.tuples(st.just("claim"), st.sets(st.integers(0, 40), min_size=1, max_size=6)),
    st.tuples(st.just("wait"), st.floats(min_value=0, max_value=DAY)),
    st.tuples(st.just("restart"), st.none()),  # a new store on the same file
    st.tuples(st.just("reopen"), st.none()),  # the file closed and opened again
)


@settings(max_examples=40, deadline=None)
@given(
    actions=st.lists(_action, min_size=1, max_size=25),
    ttl=st.integers(min_value=1, max_value=2 * DAY),
    start=st.floats(min_value=0, max_value=DAY),
    recent_keys=st.sampled_from([1, 2, 5]),
    mid_keys=st.sampled_from([1, 3, 10]),
)
def test_idempotency_property_through_the_levels(
    actions: list[tuple[str, Any]], ttl: int, start: float, recent_keys: int, mid_keys: int
) -> None:
    """Any interleaving of claims, time passing (days turning, runs dropped), restarts and
    reopenings, with the log merging into `idem_mid` and `idem_mid` becoming a run often:
    after every step a key is seen exactly while its latest claim is younger than the TTL
    (claimed keys stay seen, expired ones never come back)."""

    async def check() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s.db"
            clock = FakeClock(T0 + start)
            db = await SQLiteDB.open(path)

            def new_store() -> SQLiteIdempotencyStore:
                return SQLiteIdempotencyStore(
                    db, ttl_seconds=ttl, clock=clock, recent_keys=recent_keys, mid_keys=mid_keys
                )

            store = new_store()
            latest: dict[bytes, float] = {}
            # keys spread over the key space (every key range of every level)
            everything = [bytes([i * 6]) + i.to_bytes(31, "big") for i in range(41)]
            try:
                for what, arg in actions:
                    if what == "claim":
                        keys = [everything[i] for i in sorted(arg)]
                        await store.claim(keys)
                        latest.update((k, clock.now) for k in keys)
                    elif what == "wait":
                        clock.now += arg
                    elif what == "restart":
                        store = new_store()
                    else:
                        await db.close()
                        db = await SQLiteDB.open(path)
                        store = new_store()
                    expect = [k in latest and clock.now - latest[k] < ttl for k in everything]
                    assert await store.seen(everything) == expect
                    # a key re-claimed may be in two levels until they merge: counted twice
                    assert (await store.stats())["keys"] >= sum(expect)
                assert len(set(await _days(db))) <= ttl // DAY + 2  # expired days dropped
            finally:
                await db.close()

    asyncio.run(check())


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=2 * DAY), st.sets(st.integers(0, 20))),
        min_size=1,
        max_size=12,
    ),
    ttl=st.integers(min_value=1, max_value=3 * DAY),
    start=st.floats(min_value=0, max_value=DAY),
    recent_keys=st.sampled_from([1, 5, 20, 50_000]),
)
def test_idempotency_property_across_days(
    steps: list[tuple[float, set[int]]], ttl: int, start: float, recent_keys: int
) -> None:
    """Claims spread over days (runs made and dropped on the way, the log merged every
    `recent_keys` keys): a key is seen exactly while its latest claim is younger than the
    TTL."""

    async def check() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            db = await SQLiteDB.open(Path(tmp) / "s.db")
            clock = FakeClock(T0 + start)
            store = SQLiteIdempotencyStore(
                db, ttl_seconds=ttl, clock=clock, recent_keys=recent_keys
            )
            latest: dict[bytes, float] = {}
            everything = [i.to_bytes(32, "big") for i in range(21)]
            for wait, ids in steps:
                clock.now += wait
                keys = [i.to_bytes(32, "big") for i in sorted(ids)]
                await store.claim(keys)
                latest.update((k, clock.now) for k in keys)
                expect = [k in latest and clock.now - latest[k] < ttl for k in everything]
                assert await store.seen(everything) == expect
            assert len(set(await _days(db))) <= ttl // DAY + 2  # expired days are dropped
            await db.close()

    asyncio.run(check())


_CLAIMER = """
import asyncio, hashlib, sys
from pathlib import Path
from ingest.state.sqlite import SQLiteDB
from ingest.state.sqlite_idem import SQLiteIdempotencyStore

async def main(path: str, first: int) -> None:
    db = await SQLiteDB.open(Path(path))
    store = SQLiteIdempotencyStore(db, recent_keys=40, mid_keys=150)
    i = first
    while True:
        keys = [hashlib.sha256(b"%d-%d" % (i, j)).digest() for j in range(20)]
        await store.seen(keys)
        await store.claim(keys)
        print(i, flush=True)  # claimed: every later seen() must find these
        i += 1

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_idempotency_claims_survive_kill9_at_any_merge_step(tmp_path: Path) -> None:
    """A process claiming without pause (merges of both levels every few claims) is killed
    with SIGKILL at random moments and started again on the same file: every batch whose
    claim returned is seen afterwards, wherever the kill fell (a move between levels is one
    transaction)."""
    import hashlib
    import random
    import signal
    import subprocess
    import sys

    path = tmp_path / "state.db"
    rng = random.Random(12)
    claimed = -1
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, str(path), str(claimed + 1)],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        assert proc.stdout is not None
        start = time.monotonic()
        wait = rng.uniform(0.5, 2.0)
        while time.monotonic() - start < wait or claimed < 0:
            line = proc.stdout.readline()
            assert line, f"claimer ended: {proc.wait()}"
            claimed = int(line)
        proc.send_signal(signal.SIGKILL)
        for line in proc.stdout:  # claims reported before the kill landed
            claimed = int(line)
        proc.wait()

    async def check() -> list[bool]:
        db = await SQLiteDB.open(path)
        try:
            store = SQLiteIdempotencyStore(db)
            keys = [hashlib.sha256(b"%d-%d" % (i, j)).digest()
                    for i in range(claimed + 1) for j in range(20)]  # fmt: skip
            return await store.seen(keys)
        finally:
            await db.close()

    found = asyncio.run(check())
    assert claimed > 40  # merges of both levels happened
    assert all(found), f"{found.count(False)} claimed keys lost"


async def test_idempotency_seen_handles_batches_beyond_one_query(db: SQLiteDB) -> None:
    store = SQLiteIdempotencyStore(db)
    keys = [i.to_bytes(32, "big") for i in range(2500)]
    await store.claim(keys[::2])
    assert await store.seen(keys) == [i % 2 == 0 for i in range(2500)]


_keys = st.binary(min_size=32, max_size=32)


@settings(max_examples=40, deadline=None)
@given(
    claimed=st.sets(_keys, min_size=1, max_size=30),
    other=st.sets(_keys, max_size=30),
    ttl=st.integers(min_value=1, max_value=10_000),
    elapsed=st.floats(min_value=0, max_value=20_000, allow_nan=False),
)
def test_idempotency_property(
    claimed: set[bytes], other: set[bytes], ttl: int, elapsed: float
) -> None:
    """seen() is True for a claimed key until its TTL passes, always False if never claimed."""
    never = sorted(other - claimed)

    async def check() -> tuple[list[bool], list[bool]]:
        with tempfile.TemporaryDirectory() as tmp:
            db = await SQLiteDB.open(Path(tmp) / "s.db")
            clock = FakeClock()
            store = SQLiteIdempotencyStore(db, ttl_seconds=ttl, clock=clock)
            await store.claim(sorted(claimed))
            clock.now += elapsed
            result = await store.seen(sorted(claimed)), await store.seen(never)
            await db.close()
            return result

    seen_claimed, seen_never = asyncio.run(check())
    assert seen_claimed == [elapsed < ttl] * len(claimed)
    assert seen_never == [False] * len(never)


# ------------------------------------------------------------------------------------ DLQ


async def test_dlq_add_is_an_idempotent_upsert(db: SQLiteDB) -> None:
    dlq = SQLiteDLQStore(db)
    await dlq.add([entry(1, attempts=3), entry(1, sink=None, reason=ReasonCode.SCHEMA_DRIFT)])
    later = entry(1, attempts=2, reason=ReasonCode.CONNECTION_ERROR, at=T0 + 100)
    later.detail = {"message": "again"}
    await dlq.add([later])
    pages = [e async for page in dlq.scan(DLQFilter()) for e in page]
    assert len(pages) == 2
    at_sink = next(e for e in pages if e.sink == "sqlite")
    assert at_sink.attempts == 5
    assert at_sink.reason is ReasonCode.CONNECTION_ERROR
    assert at_sink.detail == {"message": "again"}
    assert at_sink.first_failed_at == datetime.fromtimestamp(T0, UTC)
    assert at_sink.last_failed_at == datetime.fromtimestamp(T0 + 100, UTC)
    assert at_sink.payload == b'{"n": 1}' and at_sink.revision == 1
    pre_sink = next(e for e in pages if e.sink is None)
    assert pre_sink.reason is ReasonCode.SCHEMA_DRIFT and pre_sink.attempts == 1
    assert (await dlq.health())["entries"] == 2


async def test_dlq_filters(db: SQLiteDB) -> None:
    dlq = SQLiteDLQStore(db)
    await dlq.add(
        [
            entry(1, tenant="acme", reason=ReasonCode.SCHEMA_DRIFT, sink=None, at=T0),
            entry(2, tenant="acme", reason=ReasonCode.SINK_TIMEOUT, at=T0 + 10),
            entry(3, tenant="acme", reason=ReasonCode.SINK_TIMEOUT, source="webhook", at=T0 + 20),
            entry(4, tenant="globex", reason=ReasonCode.SINK_TIMEOUT, sink="neo4j", at=T0 + 30),
        ]
    )

    def at(seconds: float) -> datetime:
        return datetime.fromtimestamp(T0 + seconds, UTC)

    async def ids(flt: DLQFilter) -> list[int | None]:
        found = [e.revision async for p in dlq.scan(flt) for e in p]
        assert await dlq.count(flt) == len(found)
        return found

    assert await ids(DLQFilter()) == [1, 2, 3, 4]
    assert await ids(DLQFilter(tenant="acme")) == [1, 2, 3]
    assert await ids(DLQFilter(reasons=[ReasonCode.SINK_TIMEOUT])) == [2, 3, 4]
    assert await ids(DLQFilter(sources=["webhook"])) == [3]
    assert await ids(DLQFilter(sinks=["-"])) == [1]
    assert await ids(DLQFilter(sinks=["-", "neo4j"])) == [1, 4]
    assert await ids(DLQFilter(since=at(10), until=at(30))) == [2, 3]
    assert await ids(DLQFilter(older_than=at(10))) == [1]
    naive = datetime.fromtimestamp(T0 + 20, UTC).replace(tzinfo=None)  # naive = UTC
    assert await ids(DLQFilter(since=naive)) == [3, 4]
    all_ids = [e.id async for p in dlq.scan(DLQFilter()) for e in p]
    assert await ids(DLQFilter(ids=[i for i in all_ids if i is not None][1:3])) == [2, 3]
    assert await ids(DLQFilter(tenant="acme", reasons=[ReasonCode.OLDER_REVISION])) == []


async def test_dlq_groups(db: SQLiteDB) -> None:
    dlq = SQLiteDLQStore(db)
    await dlq.add(
        [entry(i, at=T0 + i, attempts=2) for i in range(5)]
        + [entry(10, sink=None, reason=ReasonCode.VALIDATION_FAIL)]
        + [entry(11, tenant="globex")]
    )
    groups = await dlq.groups(DLQFilter(tenant="acme"))
    assert [(g.reason, g.sink, g.source, g.count) for g in groups] == [
        (ReasonCode.SINK_TIMEOUT, "sqlite", "inbox", 5),
        (ReasonCode.VALIDATION_FAIL, None, "inbox", 1),
    ]
    assert groups[0].oldest == datetime.fromtimestamp(T0, UTC)
    assert groups[0].newest == datetime.fromtimestamp(T0 + 4, UTC)
    assert groups[0].extra["attempts"] == 10


async def test_dlq_scan_pages_while_deleting(db: SQLiteDB) -> None:
    dlq = SQLiteDLQStore(db)
    await dlq.add([entry(i) for i in range(1, 1001)])
    seen: list[int | None] = []
    async for page in dlq.scan(DLQFilter(), batch_size=128):
        assert len(page) <= 128
        seen.extend(e.revision for e in page)
        # redrive: delete every other entry of the page, and a later one too
        assert await dlq.delete([e.id for e in page[::2] if e.id is not None]) == len(page[::2])
    assert seen == list(range(1, 1001))  # nothing skipped, nothing repeated
    assert await dlq.count(DLQFilter()) == 500
    assert await dlq.delete([]) == 0


async def test_dlq_fail_again(db: SQLiteDB) -> None:
    clock = FakeClock(T0 + 500)
    dlq = SQLiteDLQStore(db, clock=clock)
    await dlq.add([entry(1, attempts=2)])
    [[e]] = [p async for p in dlq.scan(DLQFilter())]
    assert e.id is not None
    await dlq.fail_again(e.id, ReasonCode.CONSTRAINT_VIOLATION, {"message": "dup"}, attempts=3)
    [[after]] = [p async for p in dlq.scan(DLQFilter())]
    assert after.attempts == 5
    assert after.reason is ReasonCode.CONSTRAINT_VIOLATION
    assert after.detail == {"message": "dup"}
    assert after.first_failed_at == datetime.fromtimestamp(T0, UTC)
    assert after.last_failed_at == datetime.fromtimestamp(T0 + 500, UTC)


async def test_dlq_processed_counts(db: SQLiteDB) -> None:
    dlq = SQLiteDLQStore(db)
    assert await dlq.processed_total(None) == 0
    await dlq.record_processed({("acme", "inbox"): 10, ("globex", "inbox"): 5})
    await dlq.record_processed({("acme", "inbox"): 7, ("acme", "webhook"): 1})
    assert await dlq.processed_total("acme") == 18
    assert await dlq.processed_total("globex") == 5
    assert await dlq.processed_total(None) == 23
    health = await dlq.health()
    assert health == {"backend": "sqlite", "path": str(db.path), "ok": True, "entries": 0}


async def test_dlq_visible_to_another_process_connection(db: SQLiteDB) -> None:
    """dlqtriage opens the same file separately: committed entries must be visible."""
    await SQLiteDLQStore(db).add([entry(1), entry(2)])
    other = sqlite3.connect(db.path)
    try:
        assert other.execute("SELECT count(*) FROM dlq").fetchone()[0] == 2
    finally:
        other.close()


# ---------------------------------------------------------------------------------- drops


async def test_dropped_store(db: SQLiteDB) -> None:
    store = SQLiteDroppedStore(db)
    rows = [
        (i.to_bytes(32, "big"), "acme" if i % 3 else "globex", "inbox", b"p%d" % i, T0 + i)
        for i in range(10)
    ]
    await store.add(rows)
    await store.add(rows[:4])  # idempotent on key
    assert await store.count() == 10
    assert await store.count("globex") == 4
    got = [r async for page in store.scan("acme", batch_size=3) for r in page]
    assert got == [r for r in rows if r[1] == "acme"]
    assert await store.delete([r[0] for r in got] + [b"\xff" * 32]) == 6
    assert await store.count() == 4
    assert [r async for page in store.scan("acme") for r in page] == []


# --------------------------------------------------------------------------------- intake


async def test_intake_append_read_delete_backlog(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = await SQLiteDB.open(path)
    intake = SQLiteIntake(db)
    assert await intake.backlog() == (0, None, 0)
    a = await intake.append("acme", "webhook", [b'{"a":1}', b'{"a":2}', b'{"a":3}'], T0)
    b = await intake.append("acme", "webhook", [b'{"b":1}'], T0 + 1)
    c = await intake.append("globex", "webhook", [b'{"c":1}', b'{"c":2}'], T0 + 2)
    assert a < b < c
    await db.close()  # accepted bodies survive a restart

    db = await SQLiteDB.open(path)
    intake = SQLiteIntake(db)
    assert await intake.backlog() == (6, T0, 23 + 7 + 15)
    rows = await intake.read_after(0, limit_records=4)
    assert [r.id for r in rows] == [a, b]  # stops once 4 records are reached
    assert rows[0].lines == [b'{"a":1}', b'{"a":2}', b'{"a":3}']
    assert (rows[1].tenant, rows[1].source, rows[1].received_at) == ("acme", "webhook", T0 + 1)
    big = await intake.read_after(0, limit_records=1)
    assert [r.id for r in big] == [a]  # at least one row even when it exceeds the limit
    assert [r.id for r in await intake.read_after(b, 100)] == [c]
    await intake.delete_through([a, b])
    assert await intake.backlog() == (2, T0 + 2, 15)
    assert await intake.read_after(c, 100) == []
    await intake.delete_through([c])
    assert await intake.backlog() == (0, None, 0)
    await db.close()


async def test_intake_rejects_lines_with_newlines_and_keeps_empty_bodies(db: SQLiteDB) -> None:
    intake = SQLiteIntake(db)
    with pytest.raises(ValueError):
        await intake.append("acme", "webhook", [b"a\nb"], T0)
    empty = await intake.append("acme", "webhook", [], T0)
    [row] = await intake.read_after(0, 10)
    assert row.id == empty and row.lines == []


async def test_dlq_datetimes_are_aware_utc(db: SQLiteDB) -> None:
    dlq = SQLiteDLQStore(db)
    await dlq.add([entry(1, at=T0)])
    [[e]] = [p async for p in dlq.scan(DLQFilter())]
    assert e.first_failed_at.tzinfo is not None
    assert e.last_failed_at - e.first_failed_at == timedelta(0)
