"""The contract every state store keeps (checkpoints, idempotency keys), one suite for all:
adding a backend = one entry in STORES. Real servers: SQLite (a file), Redis
(`scripts/services/up.sh redis`). Each test has a tenant and a key prefix of its own."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ingest.state.base import CheckpointStore, IdempotencyStore
from ingest.state.redis import RedisCheckpointStore, RedisIdempotencyStore, redis_client
from ingest.state.sqlite import SQLiteCheckpointStore, SQLiteDB
from ingest.state.sqlite_idem import SQLiteIdempotencyStore

pytestmark = pytest.mark.integration


@dataclass
class State:
    checkpoints: CheckpointStore
    idem: IdempotencyStore
    close: Callable[[], Awaitable[Any]]


async def _sqlite(tmp: Path, request: Any, prefix: str) -> State:
    db = await SQLiteDB.open(tmp / "state.db")
    return State(SQLiteCheckpointStore(db, "w0"), SQLiteIdempotencyStore(db), db.close)


async def _redis(tmp: Path, request: Any, prefix: str) -> State:
    client = redis_client(request.getfixturevalue("redis_url"))

    async def close() -> None:
        async for key in client.scan_iter(match=f"{prefix}*"):
            await client.delete(key)
        await client.aclose()

    return State(RedisCheckpointStore(client, "w0"), RedisIdempotencyStore(client, prefix=prefix),
                 close)  # fmt: skip


STORES: dict[str, Callable[[Path, Any, str], Awaitable[State]]] = {
    "sqlite": _sqlite,
    "redis": _redis,
}


@pytest.fixture(params=sorted(STORES))
async def state(request: Any, tmp_path: Path) -> AsyncIterator[State]:
    s = await STORES[request.param](tmp_path, request, f"contract_{uuid.uuid4().hex[:10]}")
    yield s
    await s.close()


@pytest.fixture
def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def test_a_checkpoint_is_read_back_as_saved_per_tenant_and_source(
    state: State, tenant: str
) -> None:
    cp = state.checkpoints
    assert await cp.load(tenant, "kafka-main") is None  # nothing yet: from the beginning
    await cp.save(tenant, "kafka-main", {"offsets": {"t[0]": 41}})
    await cp.save(tenant, "kafka-main", {"offsets": {"t[0]": 42}})  # the latest wins
    await cp.save(tenant, "inbox", {"file": "a.jsonl", "line": 3})
    assert await cp.load(tenant, "kafka-main") == {"offsets": {"t[0]": 42}}
    assert await cp.load(tenant, "inbox") == {"file": "a.jsonl", "line": 3}
    assert await cp.load(f"{tenant}x", "inbox") is None
    await cp.delete(tenant, "inbox")
    assert await cp.load(tenant, "inbox") is None
    assert await cp.load(tenant, "kafka-main") == {"offsets": {"t[0]": 42}}


async def test_a_claimed_key_is_seen_and_an_unclaimed_one_is_not(state: State) -> None:
    keys = [os.urandom(32) for _ in range(50)]
    assert await state.idem.seen(keys) == [False] * 50
    await state.idem.claim(keys[:20])
    assert await state.idem.seen(keys) == [True] * 20 + [False] * 30
    await state.idem.claim(keys[:20])  # claiming again changes nothing
    assert await state.idem.seen(keys[15:25]) == [True] * 5 + [False] * 5
    assert await state.idem.seen([]) == []
