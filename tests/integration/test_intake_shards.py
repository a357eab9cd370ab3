"""The webhook intake read by N pod workers, each its tenants' partitions (`scan` with a shard).

Exactness: whatever the interleaving of appends, reads and deletes, every row is read by the
worker of its partition, once, in id order, and none is missed. Cost: a worker passes the
other shards' rows once; an idle worker does not re-scan the others' backlog on every nudge
(bench/bench_steady.py measured that scan growing with the backlog to a third of a core).
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.state.sqlite import SQLiteDB
from ingest.webhook.sqlite import SQLiteIntake, partition

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
TENANTS = [f"t{i}" for i in range(8)]


def tenant_of_shard(i: int, n: int) -> str:
    return next(f"x{k}" for k in range(10_000) if partition(f"x{k}") % n == i)


async def opcodes(db: SQLiteDB, intake: SQLiteIntake, after: int, shard: tuple[int, int]) -> int:
    """SQLite VM instructions one scan costs (counted by a progress handler)."""
    count = 0

    def tick() -> int:
        nonlocal count
        count += 1
        return 0

    def install(c: sqlite3.Connection, on: bool) -> None:
        c.set_progress_handler(tick if on else None, 1)

    await db.run(lambda c: install(c, True))
    try:
        await intake.scan(after, 1000, shard)
    finally:
        await db.run(lambda c: install(c, False))
    return count


async def test_an_idle_shard_passes_the_others_rows_once(tmp_path: Path) -> None:
    db = await SQLiteDB.open(tmp_path / "state.db")
    intake = SQLiteIntake(db)
    busy, idle = tenant_of_shard(0, 2), (1, 2)
    ids = [await intake.append(busy, "webhook", [b'{"n":1}'] * 50, T0) for _ in range(400)]
    rows, through = await intake.scan(0, 1000, idle)
    assert rows == [] and through == ids[-1]
    full = await opcodes(db, intake, 0, idle)
    again = await opcodes(db, intake, through, idle)
    assert full > 400 * 5  # the first scan steps through every row of the other shard
    assert again < 100  # the next one starts after them: its cost does not grow with them
    # a new row of its own is still found, after the others' rows
    mine = await intake.append(tenant_of_shard(1, 2), "webhook", [b"{}"], T0)
    rows, through = await intake.scan(through, 1000, idle)
    assert [r.id for r in rows] == [mine] and through == mine
    await db.close()


async def test_a_scan_stopped_by_its_limit_resumes_at_its_last_row(tmp_path: Path) -> None:
    db = await SQLiteDB.open(tmp_path / "state.db")
    intake = SQLiteIntake(db)
    mine, other = tenant_of_shard(0, 2), tenant_of_shard(1, 2)
    a = await intake.append(mine, "webhook", [b"{}"] * 3, T0)
    await intake.append(other, "webhook", [b"{}"], T0)
    c = await intake.append(mine, "webhook", [b"{}"] * 3, T0)
    rows, through = await intake.scan(0, 3, (0, 2))
    assert [r.id for r in rows] == [a] and through == a  # c is not passed over
    rows, through = await intake.scan(through, 3, (0, 2))
    assert [r.id for r in rows] == [c] and through == c
    await db.close()


async def test_a_keyed_request_is_one_row_per_worker_in_one_commit(tmp_path: Path) -> None:
    """A request whose lines carry entity keys (the door's, ingest.webhook.spread) is stored
    as one row per worker its keys fall to, in one statement: consecutive ids, the returned
    id the last; each worker's scan finds its own lines, in the order sent."""
    db = await SQLiteDB.open(tmp_path / "state.db")
    intake = SQLiteIntake(db, groups=2)
    lines = [b'{"n":%d}' % i for i in range(10)]
    keys = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    last = await intake.append("t", "wh", lines, T0, keys)
    (r0,), _ = await intake.scan(0, 100, (0, 2))
    (r1,), _ = await intake.scan(0, 100, (1, 2))
    assert sorted([r0.id, r1.id]) == [last - 1, last]
    assert r0.lines == lines[1::2] and r1.lines == lines[0::2]
    assert await intake.backlog() == (10, T0, sum(map(len, lines)) + 8)  # 4 b"\\n" a row
    await db.close()


# one step: ("append", tenant index, records) | ("read", worker, limit) | ("commit", worker)
_step = st.one_of(
    st.tuples(st.just("append"), st.integers(0, len(TENANTS) - 1), st.integers(0, 4)),
    st.tuples(st.just("read"), st.integers(0, 3), st.integers(1, 6)),
    st.tuples(st.just("commit"), st.integers(0, 3), st.just(0)),
)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(_step, max_size=40), n=st.integers(1, 4))
def test_sharded_reads_are_exact(steps: list[tuple[str, int, int]], n: int) -> None:
    """Workers 0..n-1 reading through their watermarks (as WebhookSource does) and deleting
    what they read: each row goes to the worker of its tenant's partition, exactly once, in
    id order; after a final read, every appended row has been read."""

    async def check() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            db = await SQLiteDB.open(Path(tmp) / "s.db")
            intake = SQLiteIntake(db)
            owner: dict[int, int] = {}
            marks = [0] * n
            got: list[list[int]] = [[] for _ in range(n)]
            uncommitted: list[list[int]] = [[] for _ in range(n)]

            async def read(w: int, limit: int) -> None:
                rows, marks[w] = await intake.scan(marks[w], limit, (w, n))
                got[w] += [r.id for r in rows]
                uncommitted[w] += [r.id for r in rows]

            for kind, a, b in steps:
                if kind == "append":
                    tenant = TENANTS[a]
                    owner[await intake.append(tenant, "wh", [b"{}"] * b, T0)] = (
                        partition(tenant) % n
                    )
                elif kind == "read":
                    await read(a % n, b)
                else:
                    await intake.delete_through(uncommitted[a % n])
                    uncommitted[a % n] = []
            for w in range(n):
                while True:
                    before = len(got[w])
                    await read(w, 10_000)
                    if len(got[w]) == before:
                        break
            await db.close()
            for w in range(n):
                assert got[w] == sorted(set(got[w]))  # in id order, none twice
                assert all(owner[i] == w for i in got[w])  # only its own partitions
            assert sorted(i for g in got for i in g) == sorted(owner)  # none missed

    asyncio.run(check())
