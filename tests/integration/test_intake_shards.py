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

from ingest.config import WebhookSourceConfig
from ingest.state.sqlite import SQLiteCheckpointStore, SQLiteDB
from ingest.webhook.source import WebhookSource
from ingest.webhook.sqlite import PARTITIONS, SQLiteIntake, partition

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


# ("append", entity, shape): shape 0 keyed by tenant (code before entity keys, or repair
# functions), m > 0 cut for a pod of m workers | ("read", worker, limit) | ("commit", worker)
_mixed = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 5), st.integers(0, 3)),
    st.tuples(st.just("read"), st.integers(0, 3), st.integers(1, 4)),
    st.tuples(st.just("commit"), st.integers(0, 3), st.just(0)),
)


@settings(max_examples=80, deadline=None)
@given(
    before=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=12),
    steps=st.lists(_mixed, max_size=40),
    n=st.integers(2, 3),
    barrier=st.booleans(),
)
def test_rows_of_another_pod_shape_keep_each_entitys_order(
    before: list[tuple[int, int]], steps: list[tuple[str, int, int]], n: int, barrier: bool
) -> None:
    """Rows cut for another shape of pod (another workers count, or keyed by tenant) wait in
    the intake when a pod of n starts; the pod's door appends rows of its own shape meanwhile.
    Read as WebhookSource reads (its `_held` and the scan with its barrier): an entity's rows
    are read in id order across workers, and never while an earlier row of the entity that
    another worker read is uncommitted. With the barrier off (`barrier=False`: the sources
    read as before it) it fails: `test_the_barrier_is_needed`."""
    problems = asyncio.run(_mixed_run(before, steps, n, barrier))
    if barrier:
        assert problems == []


async def _mixed_run(
    before: list[tuple[int, int]], steps: list[tuple[str, int, int]], n: int, barrier: bool
) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        db = await SQLiteDB.open(Path(tmp) / "s.db")
        intakes = {m: SQLiteIntake(db, groups=max(m, 1)) for m in range(4)}
        entity_of: dict[int, int] = {}

        async def append(entity: int, shape: int) -> None:
            keys = None if shape == 0 else [entity * 7919]
            row = await intakes[shape].append("t", "wh", [b"%d" % entity], T0, keys)
            entity_of[row] = entity

        for entity, shape in before:
            await append(entity, shape)
        cfg = WebhookSourceConfig(name="wh", linger_seconds=0)
        points = SQLiteCheckpointStore(db, "w")
        sources = [WebhookSource(cfg, SQLiteIntake(db), points, shard=(w, n)) for w in range(n)]
        uncommitted: list[list[int]] = [[] for _ in range(n)]
        last_read: dict[int, tuple[int, int]] = {}  # entity -> (row id, worker)
        problems: list[str] = []

        async def read(w: int, limit: int) -> None:
            src = sources[w]
            if barrier and await src._held():
                return
            rows, src._read_through = await src.intake.scan(
                src._read_through, limit, src.shard, (src._barrier or 0) if barrier else 0
            )
            for r in rows:
                e = entity_of[r.id]
                prev = last_read.get(e)
                if prev and prev[0] > r.id:
                    problems.append(f"entity {e}: row {r.id} read after row {prev[0]}")
                if prev and prev[1] != w and prev[0] in uncommitted[prev[1]]:
                    problems.append(f"entity {e}: row {r.id} read beside uncommitted {prev[0]}")
                last_read[e] = (r.id, w)
                uncommitted[w].append(r.id)

        for kind, a, b in steps:
            if kind == "append":
                await append(a, n)  # the running pod's door: rows of its own shape
            elif kind == "read":
                await read(a % n, b)
            else:
                await intakes[0].delete_through(uncommitted[a % n])
                uncommitted[a % n] = []
        for _ in range(2 * len(entity_of) + 2):  # drain: read and commit until nothing is left
            for w in range(n):
                await read(w, 10_000)
                await intakes[0].delete_through(uncommitted[w])
                uncommitted[w] = []
        left = await intakes[0].oldest()
        await db.close()
        assert left is None, "rows never read"
        return problems


def test_the_barrier_is_needed() -> None:
    """The draw that breaks the order without the barrier: entity 1 keyed by tenant (on the
    tenant's worker) before the pod of 2 starts, then a row of it cut for the pod on the
    other worker; read by that worker first."""
    t = partition("t") % 2
    other = 1 - t
    entity = next(e for e in range(100) if e * 7919 % 2 == other)
    steps = [("append", entity, 0), ("read", other, 5), ("read", t, 5)]
    problems = asyncio.run(_mixed_run([(entity, 0)], steps, 2, barrier=False))
    assert problems, "without the barrier the entity's new row is read first"
    assert asyncio.run(_mixed_run([(entity, 0)], steps, 2, barrier=True)) == []
    assert PARTITIONS == 1 << 16
