"""The SQLite idempotency store with many runs (a run a merge: ~40 a million keys): a store
whose filter was built from the tables (after a restart) probes a key it may hold in every
live run, and SQLite refuses an OR chain of 1,000 probes, so each statement probes at most
`_PROBE_TABLES` runs. The listing of the runs parses each name once (`_table_day`). A
merge appends its slice to a table of slices (a new table every GROUP_SLICES merges: a
schema change makes every other connection parse the whole schema again), expired tables
go a few a transaction, and a file of the runs of older code keeps working beside them."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path
from unittest import mock

from ingest.state.sqlite import _IDEM_DAY_DDL, DAY, SQLiteDB
from ingest.state.sqlite_idem import (
    GROUP_SLICES,
    SQLiteIdempotencyStore,
    _Bloom,
    _table_day,
    idem_run,
    idem_slices,
    idem_tables,
)


def _digest(i: int) -> bytes:
    return hashlib.sha256(b"s%d" % i).digest()


async def test_seen_finds_a_key_in_any_of_1200_runs_after_a_restart(tmp_path: Path) -> None:
    """1,200 runs (as 30M keys make), a claimed key in the oldest, one in the newest, one in
    the 601st; a new store on the file (its filter built from the tables, so every run may
    hold its keys) sees those three and no other. With one statement for every run SQLite
    answered "Expression tree is too large (maximum depth 1000)"."""
    now = time.time()
    day = int(now // DAY)
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:

        def make(c: sqlite3.Connection) -> None:
            c.execute("BEGIN")
            for n in range(1200):
                run = idem_run(day, 10 + n)
                c.execute(_IDEM_DAY_DDL.format(run))
                c.execute(f"INSERT INTO {run} VALUES (?, ?)", (_digest(n), now - 60))
            c.execute("COMMIT")

        await db.run(make)
        assert len(await db.run(idem_tables)) == 1200
        store = SQLiteIdempotencyStore(db, clock=lambda: now)
        asked = [_digest(0), _digest(10_000), _digest(600), _digest(1199), _digest(10_001)]
        assert await store.seen(asked) == [True, False, True, True, False]
        assert await store.seen([_digest(1199)]) == [True]
    finally:
        await db.close()


def test_a_run_s_day_and_number_from_its_name() -> None:
    """The day as days since 1970-01-01 UTC (as `idem_table` names it), the run's number;
    None for names that are not a valid day."""
    assert _table_day("idem_19700102_7") == (1, 7)
    assert _table_day("idem_20240229") == (19782, 0)
    assert _table_day("idem_20261204_55") == (20791, 55)
    assert _table_day("idem_s20261204_55") == (20791, 55)
    assert idem_slices(20791, 55) == "idem_s20261204_55"
    for name in ("idem_20230229", "idem_20261304_1", "idem_mid", "idem_20261204_x", "idem_2026"):
        assert _table_day(name) is None
    for name in ("idem_s20261204", "idem_s2026120_1", "idem_slices", "idem_s20261204_x"):
        assert _table_day(name) is None


def _schema_version(c: sqlite3.Connection) -> int:
    return int(c.execute("PRAGMA schema_version").fetchone()[0])


async def test_merges_change_the_schema_once_a_table_of_slices(tmp_path: Path) -> None:
    """40 merges (a slice each) make 40 / GROUP_SLICES tables of slices: as many schema
    changes, not 40 (each
    made every other connection of the file parse the whole schema again at its next
    statement: 150-200 ms at 10,000 tables). Every key stays seen, by the store and by a
    new one (its filter built from the tables)."""
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:
        store = SQLiteIdempotencyStore(db, recent_keys=1, mid_keys=1, slice_keys=1)
        keys = [_digest(i) for i in range(40)]
        await store.claim(keys[:1])
        before = await db.run(_schema_version)
        for key in keys[1:]:
            await store.claim([key])
        tables = -(-40 // GROUP_SLICES)
        assert await db.run(_schema_version) - before == tables - 1  # the first made above
        assert len(await db.run(idem_tables)) == tables
        others = [_digest(i) for i in range(40, 50)]
        assert await store.seen(keys + others) == [True] * 40 + [False] * 10
        again = SQLiteIdempotencyStore(db)
        assert await again.seen(keys + others) == [True] * 40 + [False] * 10
    finally:
        await db.close()


async def test_expired_tables_go_a_few_a_transaction(tmp_path: Path) -> None:
    """A day's expired tables (here 5 tables of slices and 40 runs of older code) are
    dropped one table of slices or GROUP_SLICES runs a transaction, oldest first, a claim
    at a time, not all in one transaction (4,000 runs: 7.8 s under the writer lock); the
    live keys stay seen meanwhile."""
    now = time.time()
    old_day = int(now // DAY) - 9
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:

        def make(c: sqlite3.Connection) -> None:
            c.execute("BEGIN")
            for n in range(40):
                c.execute(_IDEM_DAY_DDL.format(idem_run(old_day, 10 + n)))
            for n in range(5):
                table = idem_slices(old_day + 1, 100 + n)
                c.execute(
                    f"CREATE TABLE {table} (slice, key, claimed_at, PRIMARY KEY (slice, key))"
                )
            c.execute("COMMIT")

        await db.run(make)
        statements: list[str] = []
        await db.run(lambda c: c.set_trace_callback(statements.append))
        store = SQLiteIdempotencyStore(db, clock=lambda: now)
        live = [_digest(i) for i in range(3)]
        claims = 0
        while await db.run(idem_tables):
            await store.claim([live[claims % 3]])
            claims += 1
            assert claims < 20
        await db.run(lambda c: c.set_trace_callback(None))
        drops: list[list[str]] = []
        for sql in statements:
            if sql.startswith("BEGIN"):
                drops.append([])
            elif sql.startswith("DROP TABLE"):
                drops[-1].append(sql.split()[-1])
        drops = [d for d in drops if d]
        runs = [GROUP_SLICES] * (40 // GROUP_SLICES) + [40 % GROUP_SLICES] * (40 % GROUP_SLICES > 0)
        assert [len(d) for d in drops] == [*runs, 1, 1, 1, 1, 1]
        assert drops[len(runs) :] == [[idem_slices(old_day + 1, 100 + n)] for n in range(5)]
        assert await store.seen(live) == [True] * 3
    finally:
        await db.close()


async def test_a_file_with_runs_of_older_code_keeps_every_key(tmp_path: Path) -> None:
    """Two stores on a file whose first keys older code merged (a table a run, here made by
    `_slice_table` patched to make one), then this code's tables of slices (4 slices a
    table): every key claimed is seen, by both (their filters hold a few log rows each, so
    a key is probed only in the tables its rows went to) and by a new store (its filter
    built from the tables), and no other key."""
    dbs = [await SQLiteDB.open(tmp_path / "state.db") for _ in range(2)]

    def older(c: sqlite3.Connection, day: int, last: int) -> tuple[str, None]:
        run = idem_run(day, last)
        c.execute(_IDEM_DAY_DDL.format(run))
        return run, None

    try:
        with (
            mock.patch.object(_Bloom, "KEYS", 3),
            mock.patch("ingest.state.sqlite_idem.GROUP_SLICES", 4),
        ):
            stores = [
                SQLiteIdempotencyStore(d, recent_keys=2, mid_keys=1, slice_keys=1) for d in dbs
            ]
            keys = [_digest(i) for i in range(80)]
            with mock.patch("ingest.state.sqlite_idem._slice_table", older):
                for i in range(30):
                    await stores[i % 2].seen(keys[i : i + 1])
                    await stores[i % 2].claim(keys[i : i + 1])
            names = [n for _, n in await dbs[0].run(idem_tables)]
            assert len(names) > 10 and not [n for n in names if n.startswith("idem_s")]
            for i in range(30, 60):
                await stores[i % 2].seen(keys[i : i + 1])
                await stores[i % 2].claim(keys[i : i + 1])
            names = [n for _, n in await dbs[0].run(idem_tables)]
            assert len([n for n in names if n.startswith("idem_s")]) > 3
            expect = [True] * 60 + [False] * 20
            for store in [*stores, SQLiteIdempotencyStore(dbs[1])]:
                assert await store.seen(keys) == expect
                for i in range(0, 80, 7):
                    assert await store.seen([keys[i]]) == [i < 60]
    finally:
        for d in dbs:
            await d.close()
