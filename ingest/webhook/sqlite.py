"""The durable webhook intake queue for embedded mode (production uses a Kafka topic).

The HTTP handler answers 202 only after `append` returns, i.e. after the body is committed
to the WAL, so an accepted webhook survives a process crash. The webhook source reads rows in
id order and deletes them only once the worker has committed them downstream; a crash in
between re-reads them and idempotency absorbs the repeat. The table is created by
`ingest.state.sqlite.MIGRATIONS`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from ingest.state.sqlite import SQLiteDB, autocommit, chunks, immediate, marks
from ingest.webhook.spread import tenant_key

PARTITIONS = 1 << 16


def partition(tenant: str) -> int:
    """The tenant's intake partition, for a request whose lines are not spread (`append`
    without keys): all of them on one worker, in order."""
    return tenant_key(tenant) % PARTITIONS


def rows_of(
    tenant: str, lines: Sequence[bytes], keys: Sequence[int] | None, groups: int
) -> list[tuple[int, Sequence[bytes]]]:
    """(part, lines) of each row a request is stored as: one row in the tenant's partition
    (no keys, or one group: part < PARTITIONS), or one per group its keys fall in, part =
    groups * PARTITIONS + key % groups (so part % groups is the group, and the row says which
    count of workers it was cut for); rows in the order of each group's first line, within a
    row the order sent."""
    if keys is None or groups == 1 or not lines:
        return [(partition(tenant), lines)]
    shape = groups * PARTITIONS  # which count of workers wrote the row: `foreign_through`
    by: dict[int, list[bytes]] = {}
    for key, line in zip(keys, lines, strict=True):
        group = by.get(key % groups)
        if group is None:
            by[key % groups] = [line]
        else:
            group.append(line)
    return [(shape + g, group) for g, group in by.items()]


@dataclass(slots=True)
class IntakeRow:
    id: int
    tenant: str
    source: str
    lines: list[bytes]
    received_at: float


_INSERT = "INSERT INTO intake (tenant, source, n_records, received_at, body, part) VALUES "


class SQLiteIntake:
    """One row per accepted request and worker: the record lines joined by b"\\n" (lines
    hold no b"\\n").

    `groups`: the workers of the pod reading it (worker i reads the rows whose `part % groups
    == i`). A request whose lines come with keys is stored as one row per group its lines
    fall in (`part` = key % groups), all rows in one statement: durable together, ids
    consecutive, each group's lines in the order sent. So one tenant's records reach every
    worker while an entity's (one key) stay on one worker, in order (ingest.webhook.spread).
    A row is still never split across batches."""

    def __init__(self, db: SQLiteDB, groups: int = 1) -> None:
        self._db = db
        self.groups = max(1, groups)
        self.spread = self.groups > 1

    async def close(self) -> None:
        """Nothing of its own to close: the database belongs to the state stores."""

    async def append(
        self,
        tenant: str,
        source: str,
        lines: Sequence[bytes],
        received_at: float,
        keys: Sequence[int] | None = None,
    ) -> int:
        """Store one request body durably (committed before return); returns the id of its
        last row."""
        params: list[object] = []
        for part, group in rows_of(tenant, lines, keys, self.groups):
            body = b"\n".join(group)
            if group and body.count(b"\n") != len(group) - 1:
                raise ValueError("intake lines must not contain newlines")
            params += (tenant, source, len(group), received_at, body, part)
        sql = _INSERT + ",".join(["(?, ?, ?, ?, ?, ?)"] * (len(params) // 6))

        def write(c: sqlite3.Connection) -> int:
            # a single statement is its own transaction: committed on return, every row
            rowid = autocommit(c, sql, params).lastrowid
            assert rowid is not None
            return rowid

        return await self._db.call("intake", write)

    async def read_after(
        self, after_id: int, limit_records: int, shard: tuple[int, int] | None = None
    ) -> list[IntakeRow]:
        """Rows with id > after_id in id order; at least one row if any, then rows until
        `limit_records` records are reached (a large row is never split). `shard` (i, n):
        only the rows of worker i of n (by the part each row was cut for: `rows_of`)."""
        rows, _ = await self.scan(after_id, limit_records, shard)
        return rows

    async def foreign_through(self, groups: int, spread: bool) -> int:
        """The last id of a row cut for another shape of pod than (`groups` workers, lines
        spread or not): another `workers` count, or keyed by tenant (the code before entity
        keys, or repair functions configured). 0: none. One pass over the intake, at a
        worker's start (`WebhookSource` holds the others back until these are committed)."""
        shape = groups * PARTITIONS
        sql, args = (
            ("SELECT max(id) FROM intake WHERE part < ? OR part >= ?", (shape, shape + groups))
            if spread
            else ("SELECT max(id) FROM intake WHERE part >= ?", (PARTITIONS,))
        )

        def read(c: sqlite3.Connection) -> int:
            (top,) = c.execute(sql, args).fetchone()
            return int(top or 0)

        return await self._db.call("intake", read)

    async def oldest(self) -> int | None:
        """The id of the oldest row not yet committed (deleted), None when empty."""

        def read(c: sqlite3.Connection) -> int | None:
            (low,) = c.execute("SELECT min(id) FROM intake").fetchone()
            return None if low is None else int(low)

        return await self._db.call("intake", read)

    async def scan(
        self,
        after_id: int,
        limit_records: int,
        shard: tuple[int, int] | None = None,
        barrier: int = 0,
    ) -> tuple[list[IntakeRow], int]:
        """`read_after`, plus the id this read looked through: the next read starts after it.

        With a shard that id passes the other shards' rows too. Without it a worker whose
        shard is idle re-scans the whole backlog of the others on every nudge, and `part`,
        stored after the body (migration 9), costs each row's overflow pages: measured in
        bench/bench_steady.py, the idle worker's CPU grew with the backlog (7 % -> 37 %) and
        its back-to-back readers kept the WAL from ever restarting. Ids are AUTOINCREMENT and
        assigned under SQLite's write lock, so every row at or below max(id) read first is
        committed: nothing below the returned id can appear later.

        `barrier`: with a shard, the rows up to that id are read whatever their part (worker
        0 reads the rows of another shape of pod: `foreign_through`)."""
        where = " AND id <= ? AND (id <= ? OR part % ? = ?)" if shard else ""
        sql = (
            "SELECT id, tenant, source, n_records, received_at, body FROM intake"
            " WHERE id > ?" + where + " ORDER BY id"
        )

        def read(c: sqlite3.Connection) -> tuple[list[IntakeRow], int]:
            args: tuple[int, ...] = (after_id,)
            through = after_id
            if shard:
                (top,) = c.execute("SELECT max(id) FROM intake").fetchone()
                if top is None or top <= after_id:
                    return [], after_id
                args, through = (after_id, top, barrier, shard[1], shard[0]), top
            out: list[IntakeRow] = []
            total = 0
            for id_, tenant, source, n, received_at, body in c.execute(sql, args):
                lines = body.split(b"\n") if n else []
                out.append(IntakeRow(id_, tenant, source, lines, received_at))
                total += n
                if total >= limit_records:
                    return out, id_
            return out, max(through, out[-1].id) if out else through

        return await self._db.call("intake", read)

    async def delete_through(self, ids: Sequence[int]) -> None:
        """Forget rows whose records are durable downstream (sinks or DLQ)."""
        ids = list(ids)
        if not ids:
            return

        def write(c: sqlite3.Connection) -> None:
            with immediate(c):
                for part in chunks(ids):
                    c.execute(f"DELETE FROM intake WHERE id IN ({marks(len(part))})", part)

        await self._db.call("intake", write)

    async def backlog(self) -> tuple[int, float | None, int]:
        """(records waiting, received_at of the oldest row, bytes waiting) for queue depth,
        lag and the closed-loop bound. length() of a BLOB reads the row header only."""

        def read(c: sqlite3.Connection) -> tuple[int, float | None, int]:
            n, nbytes = c.execute(
                "SELECT COALESCE(SUM(n_records), 0), COALESCE(SUM(length(body)), 0) FROM intake"
            ).fetchone()
            row = c.execute("SELECT received_at FROM intake ORDER BY id LIMIT 1").fetchone()
            return int(n), (row[0] if row else None), int(nbytes)

        return await self._db.call("intake", read)
