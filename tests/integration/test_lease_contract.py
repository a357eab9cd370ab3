"""The contract every lease store keeps (S3/SFTP items shared by workers), one suite for all:
adding a backend = one entry in STORES. Real servers: SQLite (a file), Postgres
(`scripts/services/up.sh postgres`); the schema comes from each store's migrations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from ingest.state.leases import LeaseStore, PostgresLeaseStore, SQLiteLeaseStore
from ingest.state.postgres import migrate
from ingest.state.sqlite import SQLiteDB
from tests.integration.conftest import _drop_schema as drop_schema
from tests.integration.conftest import _fresh_schema as fresh_schema

pytestmark = pytest.mark.integration

Opened = tuple[LeaseStore, Callable[[], Awaitable[None]]]


async def _sqlite(tmp: Path, request: Any) -> Opened:
    db = await SQLiteDB.open(tmp / "state.db")
    return SQLiteLeaseStore(db), db.close


async def _postgres(tmp: Path, request: Any) -> Opened:
    url = request.getfixturevalue("pg_url")
    schema, dsn = await fresh_schema(url)  # a schema of its own, dropped afterwards
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    await migrate(pool)

    async def close() -> None:
        await pool.close()
        await drop_schema(url, schema)

    return PostgresLeaseStore(pool), close


STORES: dict[str, Callable[[Path, Any], Awaitable[Opened]]] = {
    "sqlite": _sqlite,
    "postgres": _postgres,
}


@pytest.fixture(params=sorted(STORES))
async def leases(request: Any, tmp_path: Path) -> AsyncIterator[LeaseStore]:
    store, close = await STORES[request.param](tmp_path, request)
    yield store
    await close()


async def test_one_owner_at_a_time_until_release(leases: LeaseStore) -> None:
    assert await leases.try_acquire("s3", "a", "v1", "w0", 30.0)
    assert await leases.try_acquire("s3", "a", "v1", "w0", 30.0)  # its own: again fine
    assert not await leases.try_acquire("s3", "a", "v1", "w1", 30.0)
    assert await leases.try_acquire("s3", "b", "v1", "w1", 30.0)  # another item is free
    await leases.release("s3", "a", "w0")
    assert await leases.try_acquire("s3", "a", "v1", "w1", 30.0)


async def test_an_expired_lease_is_taken_over_and_the_old_owner_cannot_renew(
    leases: LeaseStore,
) -> None:
    assert await leases.try_acquire("s3", "a", "v1", "w0", 0.3)
    await asyncio.sleep(0.6)
    assert await leases.try_acquire("s3", "a", "v1", "w1", 30.0)
    assert not await leases.renew("s3", "a", "w0", 30.0)
    assert await leases.renew("s3", "a", "w1", 30.0)


async def test_offsets_resume_in_a_version_and_restart_for_a_new_one(leases: LeaseStore) -> None:
    assert await leases.offset("s3", "a") == 0
    assert await leases.try_acquire("s3", "a", "v1", "w0", 30.0)
    await leases.save_offset("s3", "a", "w0", 120)
    await leases.release("s3", "a", "w0")
    assert await leases.try_acquire("s3", "a", "v1", "w1", 30.0)
    assert await leases.offset("s3", "a") == 120  # resumed, not read again
    await leases.save_offset("s3", "a", "w0", 999)  # not its lease any more: nothing moves
    assert await leases.offset("s3", "a") == 120
    await leases.release("s3", "a", "w1")
    assert await leases.try_acquire("s3", "a", "v2", "w0", 30.0)
    assert await leases.offset("s3", "a") == 0  # the object changed: from the start


async def test_a_done_version_is_never_taken_again_a_new_one_is(leases: LeaseStore) -> None:
    assert await leases.try_acquire("s3", "a", "v1", "w0", 30.0)
    await leases.mark_done("s3", "a", "v1", "w0")
    assert await leases.done_versions("s3") == {"a": "v1"}
    assert not await leases.try_acquire("s3", "a", "v1", "w1", 30.0)
    assert await leases.try_acquire("s3", "a", "v2", "w1", 30.0)
    assert await leases.done_versions("other") == {}
