"""The audit trail: who did what, when, from where — every admin call and replay step.

Rows are only ever appended (`audit_log` in the embedded state.db or the production Postgres,
created by each backend's migrations). Written by the HTTP layer for `/admin/*` calls made
with a valid credential (refused and failed ones too) and by the CLIs that change state
(`replayctl plan|approve|run`, `dlqtriage redrive|purge`); read with `ingest audit`.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import orjson

from ingest.errors import StoreUnavailable
from ingest.state.sqlite import autocommit

OK = "ok"
DENIED = "denied"  # authenticated, but the role or tenant scope does not allow it
REFUSED = "refused"  # allowed, but the request itself was refused (bad parameter, state)
FAILED = "failed"  # started and failed


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: float  # epoch seconds
    actor: str  # token name, or the CLI user (--as / INGEST_ACTOR / OS user)
    via: str  # token | cli | auth-disabled
    action: str  # admin.drain, replay.approve, dlq.redrive, ...
    outcome: str  # ok | denied | refused | failed
    remote: str = ""  # client address, or cli@host
    tenant: str | None = None
    target: str = ""  # plan id, parameters, ...
    detail: dict[str, Any] = field(default_factory=dict)
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class AuditFilter:
    since: float | None = None
    actor: str | None = None
    action: str | None = None  # a prefix: `admin.` = every admin call
    tenant: str | None = None
    limit: int = 100


class AuditStore(Protocol):
    async def record(self, entry: AuditEntry) -> None: ...

    async def query(self, flt: AuditFilter) -> list[AuditEntry]:
        """Newest first."""
        ...


_COLUMNS = "id, at, actor, via, action, outcome, remote, tenant, target, detail"


def _entry(row: Any) -> AuditEntry:
    detail = row[9]
    return AuditEntry(
        id=row[0],
        at=row[1],
        actor=row[2],
        via=row[3],
        action=row[4],
        outcome=row[5],
        remote=row[6],
        tenant=row[7],
        target=row[8],
        detail=orjson.loads(detail) if isinstance(detail, str | bytes) else dict(detail or {}),
    )


def _row(e: AuditEntry) -> tuple[Any, ...]:
    """The values of an INSERT, in `_COLUMNS` order after `id`."""
    detail = orjson.dumps(e.detail, default=str).decode()
    return (e.at, e.actor, e.via, e.action, e.outcome, e.remote, e.tenant, e.target, detail)


def _where(flt: AuditFilter, mark: Any) -> tuple[str, list[Any]]:
    """WHERE clause with `mark(i, sql_type)` placeholders (`?i` or `$i::type`)."""
    parts: list[str] = []
    args: list[Any] = []
    for clause, value, kind in (
        ("at >= {p}", flt.since, "double precision"),
        ("actor = {p}", flt.actor, "text"),
        ("tenant = {p}", flt.tenant, "text"),
        ("substr(action, 1, length({p})) = {p}", flt.action, "text"),
    ):
        if value is None:
            continue
        args.append(value)
        parts.append(clause.format(p=mark(len(args), kind)))
    return (" WHERE " + " AND ".join(parts)) if parts else "", args


class SQLiteAuditStore:
    def __init__(self, db: Any) -> None:  # ingest.state.sqlite.SQLiteDB
        self._db = db

    async def record(self, entry: AuditEntry) -> None:
        row = _row(entry)
        await self._db.call(
            "audit",
            lambda c: autocommit(
                c,
                "INSERT INTO audit_log (at, actor, via, action, outcome, remote, tenant, target,"
                " detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            ),
        )

    async def query(self, flt: AuditFilter) -> list[AuditEntry]:
        where, args = _where(flt, lambda i, t: f"?{i}")
        sql = f"SELECT {_COLUMNS} FROM audit_log{where} ORDER BY id DESC LIMIT ?{len(args) + 1}"

        def run(c: sqlite3.Connection) -> list[Any]:
            return c.execute(sql, (*args, flt.limit)).fetchall()

        rows = await self._db.call("audit", run)
        return [_entry(r) for r in rows]


class PostgresAuditStore:
    def __init__(self, pool: Any) -> None:  # asyncpg.Pool
        self._pool = pool

    async def _run(self, fn: Any) -> Any:
        from ingest.state.postgres import on_conn

        try:
            return await on_conn(self._pool, fn)
        except StoreUnavailable:
            raise
        except Exception as exc:
            raise StoreUnavailable("postgres", "audit_log", str(exc)) from exc

    async def record(self, entry: AuditEntry) -> None:
        args = _row(entry)
        await self._run(
            lambda c: c.execute(
                "INSERT INTO audit_log (at, actor, via, action, outcome, remote, tenant, target,"
                " detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)",
                *args,
            )
        )

    async def query(self, flt: AuditFilter) -> list[AuditEntry]:
        where, args = _where(flt, lambda i, t: f"${i}::{t}")
        sql = (
            f"SELECT id, at, actor, via, action, outcome, remote, tenant, target, detail::text"
            f" FROM audit_log{where} ORDER BY id DESC LIMIT ${len(args) + 1}"
        )
        rows = await self._run(lambda c: c.fetch(sql, *args, flt.limit))
        return [_entry(r) for r in rows]


def audit_store(stores: Any) -> AuditStore:
    """The audit store on the same database as the other state stores (`Stores`)."""
    if stores.sqlite_db is not None:
        return SQLiteAuditStore(stores.sqlite_db)
    return PostgresAuditStore(stores.pg_pool)
