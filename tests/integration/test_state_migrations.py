"""One migration mechanism for every table of every store, on real Postgres and on SQLite.

Leases, replay plans and the fleet control record once created their own tables
(`_ensure`, `ensure_schema()`); now they come with the versioned migrations like the DLQ's.
A database made by the old code is taken over: the versions are recorded, the rows kept.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from ingest.replay import plans as P
from ingest.state.control import PostgresControlStore
from ingest.state.leases import PostgresLeaseStore, SQLiteLeaseStore
from ingest.state.postgres import migrate, migration_files
from ingest.state.sqlite import MIGRATIONS, SQLiteDB

pytestmark = pytest.mark.integration

STORE_TABLES = {"ingest_source_leases", "replay_plans", "fleet_control"}

# What the stores ran before their tables became migrations (kept here, verbatim in effect).
_OLD_PG = [
    """CREATE TABLE IF NOT EXISTS ingest_source_leases (source text NOT NULL,
    item text NOT NULL, version text NOT NULL, owner text NOT NULL,
    lease_until timestamptz NOT NULL, "offset" bigint NOT NULL DEFAULT 0,
    done_version text, PRIMARY KEY (source, item))""",
    "CREATE TABLE IF NOT EXISTS replay_plans (id text PRIMARY KEY, tenant text NOT NULL,"
    " state text NOT NULL, created_at double precision NOT NULL, doc jsonb NOT NULL);"
    " CREATE INDEX IF NOT EXISTS replay_plans_tenant ON replay_plans (tenant, created_at)",
    "CREATE TABLE IF NOT EXISTS fleet_control (id smallint PRIMARY KEY CHECK (id = 1),"
    " version bigint NOT NULL, doc jsonb NOT NULL)",
]


def plan() -> P.Plan:
    src = P.PlanSource("inbox-dropped", "inbox-dropped", estimate_records=10)
    return P.Plan(id="rp-0000abcd", tenant="acme-corp", start=0.0, end=10.0, sources=[src],
                  throttle=100.0, created_at=1.0, created_by="alice")  # fmt: skip


async def tables(pool: Any) -> set[str]:
    rows = await pool.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    )
    return {r[0] for r in rows}


async def stores_work(pool: Any, dsn: str) -> None:
    leases = PostgresLeaseStore(pool)
    assert await leases.try_acquire("s3-main", "a.jsonl", "v1", "w0", 30.0)
    await leases.save_offset("s3-main", "a.jsonl", "w0", 7)
    assert await leases.offset("s3-main", "a.jsonl") == 7
    store = P.PostgresPlanStore(pool)
    await store.save(plan())
    got = await store.get("rp-0000abcd")
    assert got is not None and got.tenant == "acme-corp"
    control = PostgresControlStore(pool, dsn)
    await control.ensure_schema()
    assert (await control.read()).version == 0


async def test_a_fresh_database_gets_every_table_from_the_migrations(pg_dsn: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        versions = [v for v, _, _ in migration_files()]
        assert versions == list(range(1, len(versions) + 1))  # numbered without gaps
        assert await migrate(pool) == versions
        assert await tables(pool) >= STORE_TABLES
        assert await migrate(pool) == []  # again: nothing to do
        await stores_work(pool, pg_dsn)
    finally:
        await pool.close()


async def test_workers_starting_together_apply_each_migration_once(pg_dsn: str) -> None:
    pools = [await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(migrate(p) for p in pools))
        everything = [v for v, _, _ in migration_files()]
        assert sorted(v for a in applied for v in a) == everything  # each once, by someone
        rows = await pools[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r[0] for r in rows] == everything
    finally:
        for p in pools:
            await p.close()


async def test_a_database_made_by_the_old_ensure_schema_is_taken_over(pg_dsn: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        old = [m for m in migration_files() if m[0] <= 3]  # what main shipped before
        await pool.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, name, sql in old:
            await pool.execute(sql)
            await pool.execute("INSERT INTO schema_migrations VALUES ($1, $2)", version, name)
        for sql in _OLD_PG:
            await pool.execute(sql)
        await pool.execute(
            "INSERT INTO ingest_source_leases VALUES ('sftp', 'b.csv', 'v', 'w1', now(), 42)"
        )
        assert await migrate(pool) == [v for v, _, _ in migration_files() if v > 3]
        assert await PostgresLeaseStore(pool).offset("sftp", "b.csv") == 42  # rows kept
        await stores_work(pool, pg_dsn)
    finally:
        await pool.close()


async def test_sqlite_state_files_get_the_same_tables_the_same_way(tmp_path: Path) -> None:
    old = [m for m in MIGRATIONS if m.name not in ("source_leases", "replay_plans")]
    db = await SQLiteDB.open(tmp_path / "state.db", old)  # a file the old code made
    await db.run(lambda c: c.execute(
        'CREATE TABLE source_leases (source TEXT NOT NULL, item TEXT NOT NULL, version TEXT'
        ' NOT NULL, owner TEXT NOT NULL, lease_until REAL NOT NULL, "offset" INTEGER NOT NULL'
        ' DEFAULT 0, done_version TEXT, PRIMARY KEY (source, item))'))  # fmt: skip
    await db.run(lambda c: c.execute(
        "INSERT INTO source_leases VALUES ('sftp', 'b.csv', 'v', 'w1', 0, 42, NULL)"))  # fmt: skip
    await db.close()
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:
        rows = await db.run(lambda c: c.execute("SELECT version FROM schema_migrations").fetchall())
        assert sorted(v for (v,) in rows) == sorted(m.version for m in MIGRATIONS)
        assert await SQLiteLeaseStore(db).offset("sftp", "b.csv") == 42
        store = P.SQLitePlanStore(db)  # no ensure_schema: the table came with the file
        await store.save(plan())
        assert [p.id for p in await store.list(None)] == ["rp-0000abcd"]
    finally:
        await db.close()
    fresh = await SQLiteDB.open(tmp_path / "fresh.db")
    try:
        leases = SQLiteLeaseStore(fresh)  # no _ensure: the table came with the file
        assert await leases.try_acquire("s3-main", "a.jsonl", "v1", "w0", 30.0)
    finally:
        await fresh.close()
