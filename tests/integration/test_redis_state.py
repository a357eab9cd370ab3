"""RedisCheckpointStore and RedisIdempotencyStore against a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis

from ingest.errors import StoreUnavailable
from ingest.state.redis import DAY, RedisCheckpointStore, RedisIdempotencyStore, redis_client
from tests.integration.conftest import PrivateServer

pytestmark = pytest.mark.integration

TTL = 7 * DAY


def digests(tag: str, n: int) -> list[bytes]:
    return [hashlib.sha256(f"{tag}:{i}".encode()).digest() for i in range(n)]


async def test_checkpoint_is_readable_json_and_del_starts_over(
    rclient: aioredis.Redis, uid: str
) -> None:
    store = RedisCheckpointStore(rclient, worker="host-1234")
    tenant, source = f"acme-{uid}", "s3-main"
    assert await store.load(tenant, source) is None
    await store.save(tenant, source, {"key": "a/b.jsonl", "line": 42})

    raw = await rclient.get(f"checkpoint:{tenant}:{source}")  # what `redis-cli GET` shows
    assert isinstance(raw, bytes)
    doc = orjson.loads(raw)
    assert set(doc) == {"position", "updated_at", "worker"}
    assert doc["position"] == {"key": "a/b.jsonl", "line": 42}
    assert doc["worker"] == "host-1234"
    assert re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["updated_at"])
    assert await store.load(tenant, source) == {"key": "a/b.jsonl", "line": 42}

    await rclient.delete(f"checkpoint:{tenant}:{source}")  # `redis-cli DEL` = start over
    assert await store.load(tenant, source) is None
    await store.save(tenant, source, {"line": 1})
    await store.delete(tenant, source)
    assert await rclient.exists(f"checkpoint:{tenant}:{source}") == 0


async def test_seen_and_claim(rclient: aioredis.Redis, uid: str) -> None:
    store = RedisIdempotencyStore(rclient, prefix=f"idem_{uid}")
    keys = digests(uid, 500)
    assert await store.seen(keys) == [False] * 500
    await store.claim(keys[:200])
    assert await store.seen(keys) == [True] * 200 + [False] * 300
    await store.claim(keys[:200])  # claiming again adds nothing
    stats = await store.stats()
    assert stats["backend"] == "redis"
    assert stats["keys"] == 200
    assert stats["buckets"] == 1
    today = int(time.time() // DAY) * DAY
    assert stats["oldest_bucket"] == time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(today))
    assert stats["memory_bytes"] > 0
    assert await store.seen([]) == []


async def test_layout_is_compact_hashes_expiring_after_ttl(
    rclient: aioredis.Redis, uid: str
) -> None:
    prefix = f"idem_{uid}"
    store = RedisIdempotencyStore(rclient, prefix=prefix)
    await store.claim(digests(uid, 300))
    names = [k async for k in rclient.scan_iter(match=f"{prefix}:*", count=1000)]
    shards = [n for n in names if not n.endswith(b":n")]
    assert len(names) == len(shards) + 1  # plus the day's counter
    for name in shards[:20]:
        assert re.fullmatch(rb"idem_\w+:20\d\d-\d\d-\d\d:[0-9a-f]{5}", name)
        assert await rclient.object("encoding", name) == b"listpack"
        fields = await rclient.hkeys(name)
        assert all(len(f) == 10 for f in fields)
        ttl = await rclient.ttl(name)
        assert TTL - 60 < ttl <= TTL + DAY  # end of the claim's day + 7 days
    assert await rclient.ttl(f"{prefix}:{time.strftime('%Y-%m-%d', time.gmtime())}:n") > TTL - 60


async def test_seen_honours_ttl_to_the_hour(rclient: aioredis.Redis, uid: str) -> None:
    now = [time.time()]
    store = RedisIdempotencyStore(rclient, prefix=f"idem_{uid}", clock=lambda: now[0])
    keys = digests(uid, 10)
    await store.claim(keys)
    start = now[0]
    now[0] = start + TTL - 3600  # still within 7 days
    assert await store.seen(keys) == [True] * 10
    now[0] = start + TTL + 3601  # past 7 days (hour granularity), hash not yet expired
    assert await store.seen(keys) == [False] * 10
    assert (await store.stats())["keys"] in (0, 10)  # the day's counter may still be live


async def _calls(r: aioredis.Redis) -> dict[str, int]:
    stats = await r.info("commandstats")
    return {name: int(v["calls"]) for name, v in stats.items()}


@pytest.fixture
async def private_client(private_redis: PrivateServer) -> AsyncIterator[aioredis.Redis]:
    client = redis_client(private_redis.url)
    yield client
    await client.aclose()


async def test_one_round_trip_per_batch(private_client: aioredis.Redis, uid: str) -> None:
    store = RedisIdempotencyStore(private_client, prefix=f"idem_{uid}")
    keys = digests(uid, 2000)
    await store.seen(keys[:1])  # loads the scripts
    await store.claim(keys[:1])
    before = await _calls(private_client)
    await store.seen(keys)
    await store.claim(keys)
    assert await store.seen(keys) == [True] * 2000
    after = await _calls(private_client)
    client_cmds = {
        k: after[k] - before.get(k, 0)
        for k in after
        if k.startswith("cmdstat_") and "|" not in k and after[k] != before.get(k, 0)
    }
    # 3 EVALSHA plus the INFO that took the first snapshot; HSET etc. run inside the scripts
    assert client_cmds.pop("cmdstat_evalsha") == 3
    assert set(client_cmds) <= {
        "cmdstat_info",
        "cmdstat_hget",
        "cmdstat_hset",
        "cmdstat_expireat",
        "cmdstat_incrby",
        "cmdstat_exists",
    }
    assert client_cmds["cmdstat_info"] == 1


async def test_recovers_after_redis_restart(
    private_redis: PrivateServer, private_client: aioredis.Redis, uid: str
) -> None:
    store = RedisIdempotencyStore(private_client, prefix=f"idem_{uid}")
    checkpoints = RedisCheckpointStore(private_client, worker="w")
    keys = digests(uid, 100)
    await store.claim(keys[:50])
    assert await store.seen(keys) == [True] * 50 + [False] * 50

    await asyncio.to_thread(private_redis.run, "restart-server")  # no persistence: data gone
    assert await store.seen(keys) == [False] * 100  # scripts reloaded after NOSCRIPT
    await store.claim(keys)
    assert await store.seen(keys) == [True] * 100
    await checkpoints.save("t", "s", {"offset": 7})
    assert await checkpoints.load("t", "s") == {"offset": 7}

    await asyncio.to_thread(private_redis.run, "stop")
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await store.seen(keys)
    assert time.monotonic() - t0 < 10
    assert info.value.store == "redis"
    assert info.value.where == private_redis.url
    health = await store.health()
    assert health["connected"] is False

    await asyncio.to_thread(private_redis.run, "restart-server")
    assert await store.seen(keys) == [False] * 100
    assert (await store.health())["connected"] is True
