"""The SQLite idempotency store with many runs (a run a merge: ~40 a million keys): a store
whose filter was built from the tables (after a restart) probes a key it may hold in every
live run, and SQLite refuses an OR chain of 1,000 probes, so each statement probes at most
`_PROBE_TABLES` runs. The listing of the runs parses each name once (`_table_day`)."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

from ingest.state.sqlite import _IDEM_DAY_DDL, DAY, SQLiteDB
from ingest.state.sqlite_idem import (
    SQLiteIdempotencyStore,
    _table_day,
    idem_run,
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
    for name in ("idem_20230229", "idem_20261304_1", "idem_mid", "idem_20261204_x", "idem_2026"):
        assert _table_day(name) is None
