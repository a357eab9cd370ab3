"""The DLQ (and brownout drops) on Postgres, with asyncpg.

Schema changes are versioned SQL files in `ingest/state/migrations/NNNN_name.sql`, applied in
order by `migrate()` under an advisory lock (so N workers starting together apply each once)
and recorded in `schema_migrations`. Connection failures become `StoreUnavailable`; a call that
meets a connection the server dropped (e.g. after a restart) is retried once on a fresh one,
which is safe because every write here is an idempotent upsert or delete.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]  # no stubs; see docs/postgres.md
import orjson

from ingest.errors import StoreUnavailable
from ingest.records import DLQEntry, ReasonCode
from ingest.state.base import DLQFilter, DLQGroup, DroppedRow

T = TypeVar("T")
_MIGRATION_LOCK = 0x1D6E57  # pg_advisory_lock key shared by every worker
_DDL_LOCK = 0x1D6E59  # pg_advisory_xact_lock key of ddl_once
_MIGRATION_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    OSError,
    asyncio.TimeoutError,
)


_TARGETS: dict[int, str] = {}  # id(pool) -> DSN without password (asyncpg pools take no weakref)


def _where(dsn_or_pool: str | asyncpg.Pool) -> str:
    """The DSN without credentials, for error messages and health (pools from connect_pool)."""
    if isinstance(dsn_or_pool, str):
        return re.sub(r"//[^@/]*@", "//", dsn_or_pool)
    return _TARGETS.get(id(dsn_or_pool), "postgres")


async def connect_pool(dsn: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """A pool that connects within 2 s or raises StoreUnavailable. Without JIT: the stores'
    statements are small, and JIT compiling asyncpg's first type-introspection query on a new
    connection cost 77-120 ms against 24-37 ms without (docs/benchmarks.md, kafka3)."""
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=2.0,
            command_timeout=30.0,
            server_settings={"jit": "off"},
        )
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise StoreUnavailable("postgres", _where(dsn), f"{type(exc).__name__}: {exc}") from exc
    _TARGETS[id(pool)] = _where(dsn)
    return pool


async def on_conn(pool: asyncpg.Pool, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run `op` on a pooled connection; a connection failure becomes StoreUnavailable
    (never retried here: the pipeline's `until_ok` waits the outage out)."""
    try:
        async with pool.acquire(timeout=5.0) as conn:
            return await op(conn)
    except CONNECTION_ERRORS as exc:
        raise StoreUnavailable("postgres", _where(pool), f"{type(exc).__name__}: {exc}") from exc


async def ddl_once(conn: asyncpg.Connection, sql: str) -> None:
    """Run `CREATE ... IF NOT EXISTS` statements one process at a time: N workers starting
    together otherwise race inside Postgres (UniqueViolation on pg_type, a worker dead)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _DDL_LOCK)
        await conn.execute(sql)


def migration_files() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every packaged migration, in version order."""
    folder = resources.files("ingest.state").joinpath("migrations")
    found = []
    for item in folder.iterdir():
        m = _MIGRATION_FILE.match(item.name)
        if m:
            found.append((int(m.group(1)), item.name, item.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(pool: asyncpg.Pool) -> list[int]:
    """Apply the migrations not yet recorded; returns the versions applied now."""

    async def run(conn: asyncpg.Connection) -> list[int]:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            applied = []
            for version, name, sql in migration_files():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                applied.append(version)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    return await on_conn(pool, run)


def _filter_sql(flt: DLQFilter, args: list[Any]) -> str:
    """WHERE clause for a DLQFilter; appends its parameters to `args`."""

    def p(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    conds = ["TRUE"]
    if flt.tenant is not None:
        conds.append(f"tenant = {p(flt.tenant)}")
    if flt.reasons:
        conds.append(f"reason = ANY({p([r.value for r in flt.reasons])}::text[])")
    if flt.sources:
        conds.append(f"source = ANY({p(list(flt.sources))}::text[])")
    if flt.sinks:
        conds.append(f"sink = ANY({p(['' if s == '-' else s for s in flt.sinks])}::text[])")
    if flt.since is not None:
        conds.append(f"last_failed_at >= {p(flt.since)}")
    if flt.until is not None:
        conds.append(f"last_failed_at < {p(flt.until)}")
    if flt.older_than is not None:
        conds.append(f"first_failed_at < {p(flt.older_than)}")
    if flt.ids:
        conds.append(f"id = ANY({p(list(flt.ids))}::bigint[])")
    return " AND ".join(conds)


def _entry(row: asyncpg.Record) -> DLQEntry:
    return DLQEntry(
        dedupe_key=bytes(row["dedupe_key"]),
        tenant=row["tenant"],
        source=row["source"],
        sink=row["sink"] or None,
        reason=ReasonCode(row["reason"]),
        detail=orjson.loads(row["detail"]),
        payload=bytes(row["payload"]),
        attempts=row["attempts"],
        first_failed_at=row["first_failed_at"],
        last_failed_at=row["last_failed_at"],
        entity_type=row["entity_type"],
        entity_id=row["entity_id"],
        revision=row["revision"],
        id=row["id"],
    )


_ADD_SQL = """
INSERT INTO dlq AS d (dedupe_key, sink, tenant, source, reason, detail, payload, attempts,
                      first_failed_at, last_failed_at, entity_type, entity_id, revision)
SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                     $7::bytea[], $8::int[], $9::timestamptz[], $10::timestamptz[], $11::text[],
                     $12::text[], $13::bigint[])
ON CONFLICT (dedupe_key, sink) DO UPDATE SET
    attempts = d.attempts + excluded.attempts,
    last_failed_at = excluded.last_failed_at,
    reason = excluded.reason,
    detail = excluded.detail
"""


# DLQStore.record_processed: one upsert of a batch's counts per (tenant, source)
_PROCESSED_SQL = (
    "INSERT INTO dlq_processed AS p (tenant, source, total)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])"
    " ON CONFLICT (tenant, source) DO UPDATE SET total = p.total + excluded.total"
)
WARM_CONNECTIONS = 2  # a settle's upsert beside one other use of the pool: PostgresDLQStore.warm


class PostgresDLQStore:
    """DLQStore on the `dlq` and `dlq_processed` tables (migration 0001). Owns the pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def add(self, entries: Sequence[DLQEntry]) -> None:
        if not entries:
            return
        # one row per (dedupe_key, sink) per statement: ON CONFLICT cannot touch a row twice
        merged: dict[tuple[bytes, str], DLQEntry] = {}
        for e in entries:
            k = (e.dedupe_key, e.sink or "")
            prev = merged.get(k)
            if prev is not None:
                e = DLQEntry(**{**_fields(e), "attempts": prev.attempts + e.attempts})
            merged[k] = e
        rows = list(merged.values())
        cols: list[list[Any]] = [
            [e.dedupe_key for e in rows],
            [e.sink or "" for e in rows],
            [e.tenant for e in rows],
            [e.source for e in rows],
            [e.reason.value for e in rows],
            [orjson.dumps(e.detail).decode() for e in rows],
            [e.payload for e in rows],
            [e.attempts for e in rows],
            [e.first_failed_at for e in rows],
            [e.last_failed_at for e in rows],
            [e.entity_type for e in rows],
            [e.entity_id for e in rows],
            [e.revision for e in rows],
        ]
        await on_conn(self._pool, lambda c: c.execute(_ADD_SQL, *cols))

    async def record_processed(self, counts: Mapping[tuple[str, str], int]) -> None:
        if not counts:
            return
        keys = sorted(counts)  # fixed order: concurrent workers cannot deadlock
        args = ([t for t, _ in keys], [s for _, s in keys], [counts[k] for k in keys])
        await on_conn(self._pool, lambda c: c.execute(_PROCESSED_SQL, *args))

    async def warm(self, connections: int = WARM_CONNECTIONS) -> None:
        """Open `connections` of the pool and prepare `record_processed`'s statement on each
        (an upsert of nothing), at start: a batch's settle runs it beside other uses of the
        pool, and its first run on a connection cost a connect (~65 ms) and asyncpg's
        prepare with its type introspection (~95-150 ms) at load 10, which every worker's
        first commit after a start waited for (bench_kafka 200k)."""
        conns: list[asyncpg.Connection] = []
        try:
            for _ in range(connections):
                conns.append(await self._pool.acquire(timeout=5.0))
            for conn in conns:
                await conn.execute(_PROCESSED_SQL, [], [], [])
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(
                "postgres", _where(self._pool), f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            for conn in conns:
                await self._pool.release(conn)

    async def processed_total(self, tenant: str | None) -> int:
        sql = (
            "SELECT coalesce(sum(total), 0) FROM dlq_processed"
            " WHERE $1::text IS NULL OR tenant = $1"
        )
        return int(await on_conn(self._pool, lambda c: c.fetchval(sql, tenant)))

    async def count(self, flt: DLQFilter) -> int:
        args: list[Any] = []
        sql = f"SELECT count(*) FROM dlq WHERE {_filter_sql(flt, args)}"
        return int(await on_conn(self._pool, lambda c: c.fetchval(sql, *args)))

    async def count_records(self, flt: DLQFilter) -> int:
        args: list[Any] = []
        sql = f"SELECT count(DISTINCT dedupe_key) FROM dlq WHERE {_filter_sql(flt, args)}"
        return int(await on_conn(self._pool, lambda c: c.fetchval(sql, *args)))

    async def groups(self, flt: DLQFilter) -> list[DLQGroup]:
        args: list[Any] = []
        sql = (
            "SELECT reason, sink, source, count(*) AS n, min(last_failed_at) AS oldest,"
            " max(last_failed_at) AS newest, sum(attempts) AS attempts,"
            " count(DISTINCT tenant) AS tenants"
            f" FROM dlq WHERE {_filter_sql(flt, args)}"
            " GROUP BY reason, sink, source ORDER BY n DESC, reason, sink, source"
        )
        rows = await on_conn(self._pool, lambda c: c.fetch(sql, *args))
        return [
            DLQGroup(
                reason=ReasonCode(r["reason"]),
                sink=r["sink"] or None,
                source=r["source"],
                count=r["n"],
                oldest=r["oldest"],
                newest=r["newest"],
                extra={"attempts": int(r["attempts"]), "tenants": r["tenants"]},
            )
            for r in rows
        ]

    async def scan(self, flt: DLQFilter, batch_size: int = 500) -> AsyncIterator[list[DLQEntry]]:
        """Keyset pages on id, so deleting or updating rows between pages is safe."""
        last = 0
        while True:
            args: list[Any] = [last]
            sql = (
                f"SELECT * FROM dlq WHERE id > $1 AND {_filter_sql(flt, args)}"
                f" ORDER BY id LIMIT {int(batch_size)}"
            )
            rows = await on_conn(self._pool, _fetcher(sql, args))
            if not rows:
                return
            last = rows[-1]["id"]
            yield [_entry(r) for r in rows]
            if len(rows) < batch_size:
                return

    async def delete(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        sql = "DELETE FROM dlq WHERE id = ANY($1::bigint[])"
        status = await on_conn(self._pool, lambda c: c.execute(sql, list(ids)))
        return int(status.split()[-1])

    async def fail_again(
        self, entry_id: int, reason: ReasonCode, detail: Mapping[str, Any], attempts: int
    ) -> None:
        sql = (
            "UPDATE dlq SET attempts = attempts + $2, reason = $3, detail = $4::jsonb,"
            " last_failed_at = $5 WHERE id = $1"
        )
        args = (entry_id, attempts, reason.value, orjson.dumps(dict(detail)).decode(), _now())
        await on_conn(self._pool, lambda c: c.execute(sql, *args))

    async def health(self) -> dict[str, Any]:
        try:
            n = await on_conn(self._pool, lambda c: c.fetchval("SELECT count(*) FROM dlq"))
        except StoreUnavailable as exc:
            return {"connected": False, "target": _where(self._pool), "error": exc.cause}
        return {"connected": True, "target": _where(self._pool), "entries": int(n)}

    async def close(self) -> None:
        if not self._pool.is_closing():
            _TARGETS.pop(id(self._pool), None)
            await self._pool.close()


def _fetcher(
    sql: str, args: Sequence[Any]
) -> Callable[[asyncpg.Connection], Awaitable[list[asyncpg.Record]]]:
    async def fetch(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return list(await conn.fetch(sql, *args))

    return fetch


def _fields(e: DLQEntry) -> dict[str, Any]:
    return {name: getattr(e, name) for name in DLQEntry.__slots__}


def _now() -> datetime:
    return datetime.now(UTC)


class PostgresDroppedStore:
    """Brownout drops (migration 0002): rows (key, tenant, source, payload, dropped_at)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def add(self, records: Sequence[DroppedRow]) -> None:
        if not records:
            return
        sql = (
            "INSERT INTO dropped (key, tenant, source, payload, dropped_at)"
            " SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bytea[],"
            " $5::float8[]) ON CONFLICT (key) DO NOTHING"
        )
        cols = [list(c) for c in zip(*records, strict=True)]
        await on_conn(self._pool, lambda c: c.execute(sql, *cols))

    async def count(self, tenant: str | None = None) -> int:
        sql = "SELECT count(*) FROM dropped WHERE $1::text IS NULL OR tenant = $1"
        return int(await on_conn(self._pool, lambda c: c.fetchval(sql, tenant)))

    async def scan(
        self, tenant: str | None = None, batch_size: int = 500
    ) -> AsyncIterator[list[DroppedRow]]:
        """Pages in key order (keyset), safe to interleave with delete."""
        last = b""
        sql = (
            "SELECT key, tenant, source, payload, dropped_at FROM dropped"
            " WHERE key > $1 AND ($2::text IS NULL OR tenant = $2) ORDER BY key LIMIT $3"
        )
        while True:
            rows = await on_conn(self._pool, _fetcher(sql, [last, tenant, batch_size]))
            if not rows:
                return
            last = bytes(rows[-1]["key"])
            yield [(bytes(r[0]), r[1], r[2], bytes(r[3]), float(r[4])) for r in rows]
            if len(rows) < batch_size:
                return

    async def delete(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        sql = "DELETE FROM dropped WHERE key = ANY($1::bytea[])"
        status = await on_conn(self._pool, lambda c: c.execute(sql, list(keys)))
        return int(status.split()[-1])

    async def close(self) -> None:
        if not self._pool.is_closing():
            _TARGETS.pop(id(self._pool), None)
            await self._pool.close()
