"""The audit trail on Postgres and the seen-signature cache on Redis (real servers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from ingest.auth.seen import RedisSeen, request_key
from ingest.state.audit import DENIED, OK, AuditEntry, AuditFilter, PostgresAuditStore
from ingest.state.postgres import connect_pool, migrate

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[Any]:
    p = await connect_pool(pg_dsn)
    await migrate(p)
    yield p
    await p.close()


async def test_postgres_audit_record_and_query(pool: Any) -> None:
    store = PostgresAuditStore(pool)
    await store.record(AuditEntry(100.5, "alice", "token", "admin.drain", OK, "10.0.0.1:4000"))
    await store.record(AuditEntry(101.0, "bob", "token", "admin.pause", DENIED, "10.0.0.2:1"))
    await store.record(
        AuditEntry(
            102.0,
            "carol",
            "cli",
            "replay.approve",
            OK,
            "cli@h",
            "acme-corp",
            "rp-0000abcd",
            {"rfa": "RFA-7", "n": 1},
        )
    )
    got = await store.query(AuditFilter())
    assert [r.actor for r in got] == ["carol", "bob", "alice"]
    assert got[0].detail == {"rfa": "RFA-7", "n": 1} and got[0].tenant == "acme-corp"
    assert got[2].at == 100.5 and got[2].remote == "10.0.0.1:4000"
    assert [r.actor for r in await store.query(AuditFilter(action="admin."))] == ["bob", "alice"]
    assert [r.actor for r in await store.query(AuditFilter(since=101.0, limit=1))] == ["carol"]
    assert [r.actor for r in await store.query(AuditFilter(tenant="acme-corp"))] == ["carol"]
    assert await store.query(AuditFilter(actor="mallory")) == []


async def test_redis_seen_reserves_once_per_window_and_releases(
    rclient: aioredis.Redis, uid: str
) -> None:
    seen = RedisSeen(rclient)
    key = request_key(f"t-{uid}", int(time.time()), b"body")
    other = request_key(f"t-{uid}", int(time.time()), b"body2")
    assert await seen.reserve(key, time.time() + 1.0)
    assert not await seen.reserve(key, time.time() + 1.0)
    assert await seen.reserve(other, time.time() + 1.0)
    await seen.release(other)
    assert await seen.reserve(other, time.time() + 1.0)  # released: a refused body may come again
    await asyncio.sleep(1.2)
    assert await seen.reserve(key, time.time() + 1.0)  # expired with the window
    await rclient.delete(*(b"ingest_webhook_seen:" + k.hex().encode() for k in (key, other)))
