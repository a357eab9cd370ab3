"""Leases: one worker per object/file at a time, and the per-source set of finished items.

S3 and SFTP sources run as N identical workers over one bucket or directory. Before reading an
item (object key / file path) a worker takes a lease on it with a TTL and renews it while
reading; a worker killed mid-item stops renewing, and after the TTL another worker takes the
item over and resumes at the offset saved in the lease row. The lock is the engine's own row
atomicity (one `INSERT ... ON CONFLICT DO UPDATE ... WHERE` statement), not a home-made protocol:
Postgres for many hosts, SQLite for one host (embedded mode).

Row per (source, item): `version` (ETag, or size+mtime) being read, `owner`, `lease_until`,
`offset` (decompressed byte offset of the last committed batch, for `version`) and
`done_version` (the version finished and committed; a new version is read again from 0).

The lease row's offset is authoritative for resuming an item: it is saved after each commit
and read by whichever worker takes the item next. Sources also mirror their last commit into
the readable checkpoint key `checkpoint:<tenant>:<source>`; see docs/files.md.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import asyncpg  # type: ignore[import-untyped]  # no stubs

from ingest.state.sqlite import immediate

T = TypeVar("T")


class LeaseStore(Protocol):
    async def try_acquire(
        self, source: str, item: str, version: str, owner: str, ttl: float
    ) -> bool:
        """True if `owner` now holds the item; False if another owner holds a live lease or
        (item, version) is already done. Taking a new version resets the offset to 0."""
        ...

    async def acquire(
        self, source: str, item: str, version: str, owner: str, ttl: float
    ) -> int | None:
        """`try_acquire` that also reads the committed offset (the resume point) in the same
        round trip: the offset when `owner` now holds the item, None when it does not."""
        ...

    async def renew(self, source: str, item: str, owner: str, ttl: float) -> bool:
        """Extend a lease `owner` holds; False if it was lost (taken over after expiry)."""
        ...

    async def save_offset(self, source: str, item: str, owner: str, offset: int) -> None: ...

    async def offset(self, source: str, item: str) -> int:
        """Committed offset inside the item's current version (0 if none)."""
        ...

    async def release(self, source: str, item: str, owner: str) -> None:
        """Give the item up early (stop / shutdown) so another worker need not wait the TTL."""
        ...

    async def mark_done(self, source: str, item: str, version: str, owner: str) -> None: ...

    async def commit(
        self,
        source: str,
        owner: str,
        offsets: Sequence[tuple[str, int]],
        done: Mapping[str, str],
    ) -> None:
        """After a batch is durable, in one round trip: `save_offset` for each (item, offset),
        and `mark_done` for each item -> version of `done` (items whose last records the
        batch held). A batch of an object source may span several items."""
        ...

    async def done_versions(self, source: str) -> dict[str, str]:
        """item -> done version, for a listing pass to skip finished items in one query."""
        ...


class SQLiteRunner(Protocol):
    """What we need from `ingest.state.sqlite.SQLiteDB`: run fn(conn) on the DB's own thread."""

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...


# A live lease of another owner, or this exact version already done, makes the WHERE false:
# the row is untouched and no row counts as changed.
_SQLITE_ACQUIRE = """
INSERT INTO source_leases (source, item, version, owner, lease_until, "offset")
VALUES (?, ?, ?, ?, ?, 0)
ON CONFLICT (source, item) DO UPDATE SET
    "offset" = CASE WHEN source_leases.version = excluded.version
                    THEN source_leases."offset" ELSE 0 END,
    version = excluded.version,
    owner = excluded.owner,
    lease_until = excluded.lease_until
WHERE (source_leases.lease_until < ? OR source_leases.owner = excluded.owner)
  AND (source_leases.done_version IS NULL OR source_leases.done_version != excluded.version)
"""

# Writes after a commit apply to the owner's row, or to a row whose lease lapsed with nobody
# else holding it (slow renew); a worker that lost the item to another changes nothing.
_HELD = "source = ? AND item = ? AND (owner = ? OR lease_until < ?)"
_SQLITE_SAVE = f'UPDATE source_leases SET "offset" = ? WHERE {_HELD}'
_SQLITE_FINISH = f"UPDATE source_leases SET done_version = ?, lease_until = 0 WHERE {_HELD}"
_SQLITE_OFFSET = 'SELECT "offset" FROM source_leases WHERE source = ? AND item = ?'


class SQLiteLeaseStore:
    """Leases in the embedded SQLite state file (single host: processes share the file)."""

    def __init__(self, db: SQLiteRunner, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def _exec(self, sql: str, args: tuple[Any, ...]) -> int:
        def fn(conn: sqlite3.Connection) -> int:
            with immediate(conn):  # the file's writer lock first (ingest.state.sqlite)
                n: int = conn.execute(sql, args).rowcount
            return n

        return await self._db.run(fn)

    async def try_acquire(
        self, source: str, item: str, version: str, owner: str, ttl: float
    ) -> bool:
        now = self._clock()
        args = (source, item, version, owner, now + ttl, now)
        return await self._exec(_SQLITE_ACQUIRE, args) == 1

    async def acquire(
        self, source: str, item: str, version: str, owner: str, ttl: float
    ) -> int | None:
        now = self._clock()
        args = (source, item, version, owner, now + ttl, now)

        def fn(conn: sqlite3.Connection) -> int | None:
            with immediate(conn):
                if conn.execute(_SQLITE_ACQUIRE, args).rowcount != 1:
                    return None
                row = conn.execute(_SQLITE_OFFSET, (source, item)).fetchone()
            return int(row[0]) if row else 0

        return await self._db.run(fn)

    async def renew(self, source: str, item: str, owner: str, ttl: float) -> bool:
        sql = "UPDATE source_leases SET lease_until = ? WHERE source = ? AND item = ? AND owner = ?"
        return await self._exec(sql, (self._clock() + ttl, source, item, owner)) == 1

    async def save_offset(self, source: str, item: str, owner: str, offset: int) -> None:
        await self._exec(_SQLITE_SAVE, (offset, source, item, owner, self._clock()))

    async def offset(self, source: str, item: str) -> int:
        def fn(conn: sqlite3.Connection) -> int:
            row = conn.execute(_SQLITE_OFFSET, (source, item)).fetchone()
            return int(row[0]) if row else 0

        return await self._db.run(fn)

    async def release(self, source: str, item: str, owner: str) -> None:
        sql = "UPDATE source_leases SET lease_until = 0 WHERE source = ? AND item = ? AND owner = ?"
        await self._exec(sql, (source, item, owner))

    async def mark_done(self, source: str, item: str, version: str, owner: str) -> None:
        await self._exec(_SQLITE_FINISH, (version, source, item, owner, self._clock()))

    async def commit(
        self,
        source: str,
        owner: str,
        offsets: Sequence[tuple[str, int]],
        done: Mapping[str, str],
    ) -> None:
        now = self._clock()

        def fn(conn: sqlite3.Connection) -> None:
            with immediate(conn):  # one transaction: all or nothing
                for item, offset in offsets:
                    conn.execute(_SQLITE_SAVE, (offset, source, item, owner, now))
                for item, version in done.items():
                    conn.execute(_SQLITE_FINISH, (version, source, item, owner, now))

        await self._db.run(fn)

    async def done_versions(self, source: str) -> dict[str, str]:
        def fn(conn: sqlite3.Connection) -> dict[str, str]:
            rows = conn.execute(
                "SELECT item, done_version FROM source_leases"
                " WHERE source = ? AND done_version IS NOT NULL",
                (source,),
            ).fetchall()
            return {str(r[0]): str(r[1]) for r in rows}

        return await self._db.run(fn)


_PG_ACQUIRE = """
INSERT INTO ingest_source_leases AS l (source, item, version, owner, lease_until, "offset")
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5), 0)
ON CONFLICT (source, item) DO UPDATE SET
    "offset" = CASE WHEN l.version = excluded.version THEN l."offset" ELSE 0 END,
    version = excluded.version,
    owner = excluded.owner,
    lease_until = excluded.lease_until
WHERE (l.lease_until < now() OR l.owner = excluded.owner)
  AND l.done_version IS DISTINCT FROM excluded.version
RETURNING 1
"""

_PG_ACQUIRE_OFFSET = _PG_ACQUIRE.replace("RETURNING 1", 'RETURNING l."offset"')

# A batch's lease writes as one statement: every (item, offset), and done_version for the
# items finished by it; the same ownership condition as save_offset / mark_done.
_PG_COMMIT = """
UPDATE ingest_source_leases AS l SET
    "offset" = COALESCE(v.off, l."offset"),
    done_version = COALESCE(v.done, l.done_version),
    lease_until = CASE WHEN v.done IS NULL THEN l.lease_until ELSE '-infinity' END
FROM unnest($3::text[], $4::bigint[], $5::text[]) AS v(item, off, done)
WHERE l.source = $1 AND l.item = v.item AND (l.owner = $2 OR l.lease_until < now())
"""

_PG_HELD = "source = $1 AND item = $2 AND (owner = $3 OR lease_until < now())"


class PostgresLeaseStore:
    """Leases in Postgres for workers on many hosts; time is the server's `now()`, so worker
    clocks need not agree."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def try_acquire(
        self, source: str, item: str, version: str, owner: str, ttl: float
    ) -> bool:
        got = await self._pool.fetchval(_PG_ACQUIRE, source, item, version, owner, float(ttl))
        return got is not None

    async def acquire(
        self, source: str, item: str, version: str, owner: str, ttl: float
    ) -> int | None:
        got = await self._pool.fetchrow(
            _PG_ACQUIRE_OFFSET, source, item, version, owner, float(ttl)
        )
        return None if got is None else int(got[0])

    async def renew(self, source: str, item: str, owner: str, ttl: float) -> bool:
        status = await self._pool.execute(
            "UPDATE ingest_source_leases SET lease_until = now() + make_interval(secs => $4)"
            " WHERE source = $1 AND item = $2 AND owner = $3",
            source,
            item,
            owner,
            float(ttl),
        )
        return str(status).endswith(" 1")

    async def save_offset(self, source: str, item: str, owner: str, offset: int) -> None:
        await self._pool.execute(
            f'UPDATE ingest_source_leases SET "offset" = $4 WHERE {_PG_HELD}',
            source,
            item,
            owner,
            offset,
        )

    async def offset(self, source: str, item: str) -> int:
        got = await self._pool.fetchval(
            'SELECT "offset" FROM ingest_source_leases WHERE source = $1 AND item = $2',
            source,
            item,
        )
        return int(got) if got is not None else 0

    async def release(self, source: str, item: str, owner: str) -> None:
        await self._pool.execute(
            "UPDATE ingest_source_leases SET lease_until = '-infinity'"
            " WHERE source = $1 AND item = $2 AND owner = $3",
            source,
            item,
            owner,
        )

    async def mark_done(self, source: str, item: str, version: str, owner: str) -> None:
        await self._pool.execute(
            "UPDATE ingest_source_leases SET done_version = $4, lease_until = '-infinity'"
            f" WHERE {_PG_HELD}",
            source,
            item,
            owner,
            version,
        )

    async def commit(
        self,
        source: str,
        owner: str,
        offsets: Sequence[tuple[str, int]],
        done: Mapping[str, str],
    ) -> None:
        last = dict(offsets)
        items = [*last, *(item for item in done if item not in last)]
        await self._pool.execute(
            _PG_COMMIT,
            source,
            owner,
            items,
            [last.get(item) for item in items],
            [done.get(item) for item in items],
        )

    async def done_versions(self, source: str) -> dict[str, str]:
        rows = await self._pool.fetch(
            "SELECT item, done_version FROM ingest_source_leases"
            " WHERE source = $1 AND done_version IS NOT NULL",
            source,
        )
        return {str(r["item"]): str(r["done_version"]) for r in rows}
