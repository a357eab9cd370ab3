"""RedisCheckpointStore and RedisIdempotencyStore against a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import uuid4

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingest.errors import StoreUnavailable
from ingest.state.redis import (
    _TIME_LUA,
    DAY,
    RedisCheckpointStore,
    RedisIdempotencyStore,
    redis_client,
)
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
    start = store.bucket_start(time.time())  # the 7-day bucket of today
    assert stats["oldest_bucket"] == time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(start))
    assert stats["memory_bytes"] > 0
    assert await store.seen([]) == []


async def test_layout_of_a_first_bucket_expiring_after_ttl(
    rclient: aioredis.Redis, uid: str
) -> None:
    """A bucket with none before it: 256 hashes (2 hex digits) made at its opening in the
    hashtable encoding, each with its EXPIREAT, so claims create no key and set no expiry."""
    prefix = f"idem_{uid}"
    store = RedisIdempotencyStore(rclient, prefix=prefix)
    now = time.time()
    await store.claim(digests(uid, 300))
    start = store.bucket_start(now)  # UTC midnight of a day divisible by 7 since the epoch
    assert start % (7 * DAY) == 0 and start <= now < start + 7 * DAY
    bucket = f"{prefix}:{time.strftime('%Y-%m-%d', time.gmtime(start))}+7d:"
    names = [k async for k in rclient.scan_iter(match=f"{prefix}:*", count=1000)]
    shards = [n for n in names if not n.endswith((b":n", b":w", b":buckets"))]
    assert len(names) == len(shards) + 3  # plus the bucket's counter, its width, the registry
    assert len(shards) == 256
    for name in shards[:20]:
        assert re.fullmatch(rb"idem_\w+:20\d\d-\d\d-\d\d\+7d:[0-9a-f]{2}", name)
        assert await rclient.object("encoding", name) == b"hashtable"
        fields = await rclient.hgetall(name)
        assert b"" in fields  # the marker: set when the hash was made, with its EXPIREAT
        assert all(len(f) == 10 for f in fields if f)
        ttl = await rclient.ttl(name)
        assert TTL - 60 < ttl <= 2 * TTL  # end of the claim's bucket + 7 days
    hour = str(int(now - start) // 3600).encode()  # hour of the claim in its bucket
    for d in digests(uid, 300)[:20]:  # shard = the digest's first 2 hex digits (8 bits)
        assert await rclient.hget(f"{bucket}{d.hex()[:2]}", d[3:13]) == hour
    assert await rclient.ttl(f"{bucket}n") > TTL - 60
    registry = await rclient.hgetall(f"{prefix}:buckets")
    (meta,) = registry.values()
    assert list(registry) == [bucket.encode()]
    assert meta.split()[:3] == [str(start).encode(), str(start + 14 * DAY).encode(), b"2"]
    assert now - 1 <= int(meta.split()[3]) <= time.time()  # when it was opened
    # the width and opening time again, should the registry be lost; gone with the bucket
    assert (await rclient.get(f"{bucket}w")).split() == meta.split()[2:]
    assert TTL - 60 < await rclient.ttl(f"{bucket}w") <= 2 * TTL


async def test_layout_of_a_sized_bucket_is_compact_listpack_hashes(
    rclient: aioredis.Redis, uid: str
) -> None:
    """A bucket sized by the one before (here 3M keys a week: 5 hex digits): listpack hashes,
    each made by the claim that puts its first key in and given its EXPIREAT then."""
    prefix = f"idem_{uid}"
    week = 7 * DAY
    now = [(time.time() // week + 1) * week + 60]
    store = RedisIdempotencyStore(rclient, prefix=prefix, server_clock=lambda: now[0])
    start = store.bucket_start(now[0])
    before = store.bucket_prefix(start - week)
    await rclient.set(before + "n", 3_000_000)
    await rclient.hset(store.registry, before, f"{start - week} {start + TTL} 2 {start - week}")
    keys = digests(uid, 300)
    await store.claim(keys)
    bucket = store.bucket_prefix(start)
    meta = await rclient.hget(store.registry, bucket)
    assert meta is not None and meta.split()[2] == b"5"
    for d in keys[:20]:
        name = f"{bucket}{d.hex()[:5]}"
        assert await rclient.object("encoding", name) == b"listpack"
        fields = await rclient.hgetall(name)
        assert fields.pop(b"") == b""  # the marker: this hash got its EXPIREAT when created
        assert fields and all(len(f) == 10 for f in fields)
        assert await rclient.execute_command("EXPIRETIME", name) == start + week + TTL
        assert await rclient.hget(name, d[3:13]) == b"0"  # a minute into the bucket: hour 0


async def test_seen_honours_ttl_to_the_hour(rclient: aioredis.Redis, uid: str) -> None:
    now = [time.time()]
    store = RedisIdempotencyStore(rclient, prefix=f"idem_{uid}", server_clock=lambda: now[0])
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
        "cmdstat_hmget",  # a part of few hashes: one HMGET per hash
        "cmdstat_hset",
        "cmdstat_expireat",
        "cmdstat_incrby",
        "cmdstat_exists",
        "cmdstat_hgetall",  # the bucket registry, once per script call
        "cmdstat_time",  # Redis's clock, once per script call
        "cmdstat_get",  # `<bucket>w` of a bucket not in the registry, once per seen
        "cmdstat_set",  # `<bucket>w` NX, once per claim
    }
    assert client_cmds["cmdstat_info"] == 1
    assert client_cmds["cmdstat_time"] == 3
    assert client_cmds["cmdstat_get"] == 2  # the bucket before: never opened on this Redis
    assert client_cmds["cmdstat_set"] == 1


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


# The claim script before the marker field (main at 584de71): hashes it wrote are what a
# deployed service upgrades in place with, and what a not-yet-upgraded worker keeps writing.
LEGACY_CLAIM = """
local prefix, hour, expire_at = ARGV[1], ARGV[2], ARGV[3]
local div, width = tonumber(ARGV[4]), tonumber(ARGV[5])
local fmt = '%0' .. width .. 'x'
local touched, added = {}, 0
local blob = ARGV[6]
for i = 1, #blob, 13 do
  local d = string.sub(blob, i, i + 12)
  local b1, b2, b3 = string.byte(d, 1, 3)
  local key = prefix .. string.format(fmt, math.floor((b1 * 65536 + b2 * 256 + b3) / div))
  added = added + redis.call('HSET', key, string.sub(d, 4, 13), hour)
  touched[key] = true
end
for key in pairs(touched) do redis.call('EXPIREAT', key, expire_at) end
local counter = prefix .. 'n'
redis.call('INCRBY', counter, added)
redis.call('EXPIREAT', counter, expire_at)
return added
"""


async def test_claims_set_expireat_only_on_hashes_they_create(
    private_client: aioredis.Redis, uid: str
) -> None:
    """16 shards: the claim that opens the bucket makes every hash and gives each its
    EXPIREAT; claims then set none (only the bucket's counter, once per batch), and put a
    batch's keys into a hash with one HSET."""
    prefix = f"idem_{uid}"
    store = RedisIdempotencyStore(private_client, prefix=prefix, shard_bits=4)
    keys = digests(uid, 4000)
    await store.seen(keys[:1])  # loads the scripts
    before = await _calls(private_client)
    await store.claim(keys[:2000])
    middle = await _calls(private_client)
    await store.claim(keys[2000:])
    after = await _calls(private_client)
    # 16 hashes, the counter and the registry (the first claim opens the bucket)
    assert middle["cmdstat_expireat"] - before.get("cmdstat_expireat", 0) == 16 + 1 + 1
    assert after["cmdstat_expireat"] - middle["cmdstat_expireat"] == 1
    assert after["cmdstat_hset"] - middle["cmdstat_hset"] == 16  # one HSET per hash
    assert await store.seen(keys) == [True] * 4000
    assert (await store.stats())["keys"] == 4000  # the marker is not counted as a key
    bucket = store.bucket_prefix(store.bucket_start(time.time()))
    for shard in "0123456789abcdef":
        name = f"{bucket}{shard}"
        assert TTL - 60 < await private_client.ttl(name) <= 2 * TTL
        # the keys are random (the uid), so a shard's share varies (~250 +- 15): count it
        expected = sum(1 for key in keys if key.hex()[0] == shard)
        assert await private_client.hlen(name) == expected + 1  # its keys + the marker


# The claim script of the day-bucket layout (main at 879a4f6, with the marker field): the keys a
# deployed service holds when it upgrades, and what a not-yet-upgraded worker keeps writing.
DAY_CLAIM = """
local prefix, hour, expire_at, width = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local hex, blob = ARGV[5], ARGV[6]
local added, h = 0, 1
for i = 1, #blob, 13 do
  local key = prefix .. string.sub(hex, h, h + width - 1)
  local n = redis.call('HSET', key, '', '', string.sub(blob, i + 3, i + 12), hour)
  if n == 2 then redis.call('EXPIREAT', key, expire_at) end
  if n > 0 then added = added + 1 end
  h = h + 26
end
redis.call('INCRBY', prefix .. 'n', added)
redis.call('EXPIREAT', prefix .. 'n', expire_at)
return added
"""


async def day_claim(
    r: aioredis.Redis,
    store: RedisIdempotencyStore,
    keys: list[bytes],
    now: float,
    bits: int,
    ttl: int = TTL,
    *,
    marker: bool = True,
) -> None:
    """Claim `keys` into the day buckets as main at 879a4f6 did (`marker`) or 584de71."""
    day = int(now // DAY)
    hour = int(now - day * DAY) // 3600
    raw = b"".join(k[:13] for k in keys)
    args = [store.day_prefix(day), hour, (day + 1) * DAY + ttl]
    if marker:
        await r.eval(DAY_CLAIM, 0, *args, bits // 4, raw.hex(), raw)
    else:
        await r.eval(LEGACY_CLAIM, 0, *args, 2 ** (24 - bits), bits // 4, raw)


async def test_keys_of_the_day_layouts_are_seen_until_they_expire(
    rclient: aioredis.Redis, uid: str
) -> None:
    """Upgrade in place: keys claimed into day buckets (with and without the marker) are seen
    beside the new buckets; an old worker still writing day buckets loses nothing; once the
    TTL has passed they are not seen, and the new buckets never were day buckets."""
    prefix = f"idem_{uid}"
    now = [time.time() + 60]
    store = RedisIdempotencyStore(
        rclient, prefix=prefix, server_clock=lambda: now[0], old_shard_bits=8
    )
    old, day, new, late = (digests(f"{uid}{t}", 300) for t in "odnl")
    await day_claim(rclient, store, old, now[0], 8, marker=False)
    await day_claim(rclient, store, day, now[0], 8)
    assert await store.seen(old + day + new) == [True] * 600 + [False] * 300
    await store.claim(old[:100] + new)  # into the new bucket, some keys again
    await day_claim(rclient, store, late, now[0], 8)  # a worker not yet upgraded
    assert await store.seen(old + day + new + late) == [True] * 1200
    stats = await store.stats()
    assert stats["keys"] == 900 + 400  # today's day counter, the new bucket's counter
    assert stats["buckets"] == 2
    for name in [k async for k in rclient.scan_iter(match=f"{prefix}:*", count=1000)]:
        day_layout = re.search(rb":\d{4}-\d\d-\d\d:", name)  # else a new bucket, the registry
        assert TTL - 60 < await rclient.ttl(name) <= (TTL + DAY if day_layout else 2 * TTL) + 120
    now[0] += TTL + 3600  # past the TTL (to the hour) of every claim
    assert await store.seen(old + day + new + late) == [False] * 1200
    await store.claim(late)  # the next bucket
    assert await store.seen(old + day + new + late) == [False] * 900 + [True] * 300


async def test_buckets_of_another_ttl_are_found(rclient: aioredis.Redis, uid: str) -> None:
    """The registry lists every live bucket, so a changed TTL (another bucket width) still
    finds the keys claimed before the change, by the TTL in force when asked."""
    prefix = f"idem_{uid}"
    now = [time.time() + 60]
    at = {"server_clock": lambda: now[0]}
    week = RedisIdempotencyStore(rclient, TTL, prefix, **at)
    three = RedisIdempotencyStore(rclient, 3 * DAY, prefix, **at)
    one = RedisIdempotencyStore(rclient, DAY, prefix, shard_bits=8, **at)
    a, b = digests(f"{uid}a", 200), digests(f"{uid}b", 200)
    await week.claim(a)
    now[0] += 2 * DAY
    await one.claim(b)  # a 1-day bucket, 2 hex digits of shard
    for store in (week, three, one):
        want_a = store is not one  # 2 days old: past one day, within three
        assert await store.seen(a + b) == [want_a] * 200 + [True] * 200
    now[0] += 2 * DAY + 3600  # a: 4 days + 1 h old; b's 1-day bucket: past its end + 1 day
    assert await three.seen(a + b) == [False] * 400
    assert await week.seen(a + b) == [True] * 200 + [False] * 200
    assert (await week.stats())["buckets"] == 1


async def test_a_bucket_sizes_its_shards_by_the_bucket_before(
    rclient: aioredis.Redis, uid: str
) -> None:
    """~32 keys a hash at the last bucket's rate (so <= 128, the listpack limit, up to 4x it),
    scaled up when the last bucket was opened late, never beyond `shard_bits`; a bucket
    whose predecessor saw less than an eighth of its span opens as a first bucket does."""
    prefix = f"idem_{uid}"
    week = 7 * DAY
    now = [(time.time() // week + 1) * week]  # the start of next week's bucket
    store = RedisIdempotencyStore(rclient, prefix=prefix, server_clock=lambda: now[0])
    keys = digests(uid, 300)

    async def width() -> int:
        start = store.bucket_start(now[0])
        meta = await rclient.hget(store.registry, store.bucket_prefix(start))
        assert meta is not None
        assert meta.split()[:2] == [str(start).encode(), str(start + week + TTL).encode()]
        return int(meta.split()[2])

    await store.claim(keys)
    assert await width() == 2  # nothing before it: 2^8 hashtable hashes
    for count, opened_late, want in [
        (300, 0, 1),  # 300 a week: 16 shards of ~19
        (10_000_000, 0, 5),  # 10M a week: 2^20 shards of ~10
        (1_000_000, 6 * DAY, 5),  # 1M in its last day: 7M a week
        (40_000_000_000, 0, 6),  # more than 2^24 shards hold at 32: the most allowed
        (1_000_000, 6 * DAY + 82_000, 2),  # open for < 1/8 of its span: not a measure
    ]:
        prev = store.bucket_prefix(store.bucket_start(now[0]))
        await rclient.set(prev + "n", count)
        if opened_late:
            start = store.bucket_start(now[0])
            await rclient.hset(
                store.registry, prev, f"{start} {start + week + TTL} 6 {start + opened_late}"
            )
        now[0] += week
        await store.claim(keys)
        assert await width() == want, (count, opened_late)
        assert await store.seen(keys) == [True] * 300
    names = [k async for k in rclient.scan_iter(match=f"{prefix}:*", count=1000)]
    hashes = [n for n in names if b"+" in n and not n.endswith((b":n", b":w"))]
    # the unmeasured buckets' 2-digit hashes are made as hashtables; every sized one is compact
    sized = [n for n in hashes if len(n.rsplit(b":", 1)[1]) != 2]
    assert sized and {await rclient.object("encoding", n) for n in sized} == {b"listpack"}


async def test_a_registry_entry_without_its_opening_time_is_kept(
    rclient: aioredis.Redis, uid: str
) -> None:
    """1fa79dc wrote `<start> <expire_at> <width>`: claims go on at that width, the next
    bucket opens as a first bucket (no measure of the one before)."""
    prefix = f"idem_{uid}"
    now = [time.time() + 60]
    store = RedisIdempotencyStore(rclient, prefix=prefix, server_clock=lambda: now[0])
    start = store.bucket_start(now[0])
    bucket = store.bucket_prefix(start)
    await rclient.hset(store.registry, bucket, f"{start} {start + 14 * DAY} 3")
    keys = digests(uid, 100)
    await store.claim(keys)
    assert await rclient.hget(store.registry, bucket) == f"{start} {start + 14 * DAY} 3".encode()
    assert await rclient.exists(f"{bucket}{keys[0].hex()[:3]}") == 1
    now[0] += 7 * DAY
    await store.claim(keys[:1])
    meta = await rclient.hget(store.registry, store.bucket_prefix(start + 7 * DAY))
    assert meta is not None and meta.split()[2] == b"2"
    assert await store.seen(keys) == [True] * 100


async def drop(client: aioredis.Redis, prefix: str) -> None:
    """Deletes a test's keys and closes its client."""
    names = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if names:
        await client.delete(*names)
    await client.aclose()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    bits=st.sampled_from([4, 24, None]),
    old_bits=st.sampled_from([4, 20]),
    ttl=st.sampled_from([3600, 5400, DAY, 2 * DAY + 1800, 7 * DAY]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["claim", "claim", "day", "legacy", "seen", "seen"]),
            st.floats(0, 3 * DAY),  # seconds the clock moves first
            st.lists(st.integers(0, 59), min_size=1, max_size=20, unique=True),
        ),
        min_size=1,
        max_size=16,
    ),
)
def test_seen_equals_the_model(
    redis_url: str,
    uid: str,
    bits: int | None,
    old_bits: int,
    ttl: int,
    ops: list[tuple[str, float, list[int]]],
) -> None:
    """A key is seen exactly while its latest claim's hour + 1 h + ttl is ahead of the clock:
    never a false negative within the TTL, at most the rest of the hour after it; new buckets
    and both day layouts (an old worker) mixed over weeks, shared hashes (4 bits) and one key
    per hash (20, 24 bits)."""
    universe = digests(f"{uid}{bits}{old_bits}{ttl}", 60)

    async def go() -> None:
        client = redis_client(redis_url)
        prefix = f"model_{uuid4().hex[:10]}"
        now = [time.time() + 60]  # never behind the server's clock: EXPIREAT in the future
        store = RedisIdempotencyStore(
            client,
            ttl,
            prefix,
            shard_bits=bits,
            old_shard_bits=old_bits,
            server_clock=lambda: now[0],
        )
        claimed: dict[int, float] = {}
        try:
            for op, dt, picks in ops:
                now[0] += dt
                keys = [universe[i] for i in picks]
                if op == "seen":
                    want = [
                        i in claimed and claimed[i] // 3600 * 3600 + 3600 + ttl > now[0]
                        for i in picks
                    ]
                    assert await store.seen(keys) == want
                    continue
                if op == "claim":
                    await store.claim(keys)
                elif op == "day":
                    await day_claim(client, store, keys, now[0], old_bits, ttl)
                else:
                    await day_claim(client, store, keys, now[0], old_bits, ttl, marker=False)
                claimed.update(dict.fromkeys(picks, now[0]))
        finally:
            await drop(client, prefix)

    asyncio.run(go())


async def hash_expiry(
    client: aioredis.Redis, store: RedisIdempotencyStore, key: bytes, claimed_at: float
) -> int:
    """EXPIRETIME of the hash holding `key` as claimed at `claimed_at` (any shard width)."""
    prefix = store.bucket_prefix(store.bucket_start(claimed_at))
    for width in range(1, 7):
        name = prefix + key.hex()[:width]
        if await client.hexists(name, key[3:13]):
            return int(await client.execute_command("EXPIRETIME", name))
    raise AssertionError(f"{key.hex()} is in no hash of {prefix}")


async def test_raising_the_ttl_within_the_bucket_width_holds_for_claimed_keys(
    rclient: aioredis.Redis, uid: str
) -> None:
    """Found by raising the TTL from 6 d + 1 h to 7 d: a hash got its EXPIREAT once, when it was
    created, from the TTL of then (end of bucket + 6 d 1 h), so a key claimed into it in the
    bucket's last hour, seen for 7 d, was gone 23 h early. A hash now lives until the end of
    its bucket + D days, what any TTL of that bucket width needs."""
    prefix = f"idem_{uid}"
    start = RedisIdempotencyStore(rclient).bucket_start(time.time()) + 7 * DAY  # the next one
    now = [float(start + 3600)]
    old = RedisIdempotencyStore(rclient, 6 * DAY + 3600, prefix, server_clock=lambda: now[0])
    new = RedisIdempotencyStore(rclient, 7 * DAY, prefix, server_clock=lambda: now[0])
    assert old.bucket_days == new.bucket_days == 7
    keys = digests(uid, 200)
    await old.claim(keys[:100])  # the hashes are made under the old TTL
    now[0] = start + 7 * DAY - 1800  # the bucket's last hour, under the new TTL
    await new.claim(keys)
    for key in keys:
        expiry = await hash_expiry(rclient, new, key, now[0])
        assert expiry >= start + 7 * DAY + 7 * DAY, (expiry - (start + 14 * DAY)) / 3600


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    days=st.integers(1, 8),
    ttls=st.lists(st.integers(1, DAY), min_size=2, max_size=4),
    ops=st.lists(
        st.tuples(
            st.floats(0, 3 * DAY),  # seconds the clock moves first
            st.integers(0, 3),  # which TTL the claiming store has
            st.lists(st.integers(0, 29), min_size=1, max_size=8, unique=True),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_every_seen_key_is_in_a_hash_that_lives_as_long_as_the_ttl_in_force(
    redis_url: str, uid: str, days: int, ttls: list[int], ops: list[tuple[float, int, list[int]]]
) -> None:
    """However the TTL moves within one bucket width (D days: TTLs in ((D-1) d, D d]), a key
    that counts as seen under the TTL in force (its claim's hour end + TTL ahead of the clock)
    lies in a hash whose EXPIRETIME is no earlier: it cannot vanish while it should be seen."""
    universe = digests(f"{uid}{days}", 30)
    ttl_of = [(days - 1) * DAY + t for t in ttls]

    async def go() -> None:
        client = redis_client(redis_url)
        prefix = f"ttl_{uuid4().hex[:10]}"
        now = [time.time() + 60]  # never behind the server's clock: EXPIREAT in the future
        stores = [
            RedisIdempotencyStore(client, t, prefix, server_clock=lambda: now[0]) for t in ttl_of
        ]
        claimed: dict[int, float] = {}
        try:
            for dt, which, picks in ops:
                now[0] += dt
                store = stores[which % len(stores)]
                await store.claim([universe[i] for i in picks])
                claimed.update(dict.fromkeys(picks, now[0]))
                longest = max(ttl_of)  # whichever TTL is in force from now on: the longest
                for i, at in claimed.items():
                    seen_until = at // 3600 * 3600 + 3600 + longest
                    if seen_until > now[0]:
                        expiry = await hash_expiry(client, store, universe[i], at)
                        assert expiry >= seen_until, (longest, at, expiry - seen_until)
        finally:
            await drop(client, prefix)

    asyncio.run(go())


@pytest.mark.parametrize("bits", [0, 1, 5, 21, 28])
def test_shard_bits_are_whole_hex_digits(bits: int) -> None:
    """Shard names are the digest's first hex digits, cut by the script without formatting."""
    with pytest.raises(ValueError, match="hex digits"):
        RedisIdempotencyStore(aioredis.Redis(), shard_bits=bits)
    with pytest.raises(ValueError, match="hex digits"):
        RedisIdempotencyStore(aioredis.Redis(), old_shard_bits=bits)


# -- one clock for every worker (Redis's TIME) and a registry that may be lost --------------


def test_bucket_dates_formatted_in_lua_are_pythons(redis_url: str) -> None:
    """The scripts name buckets from Redis's clock with their own day -> YYYY-MM-DD: every day
    from 1970 to 2243 (leap years, centuries, 2000) agrees with Python's."""

    async def go() -> list[bytes]:
        client = redis_client(redis_url)
        try:
            script = _TIME_LUA + (
                "local out = {} for d = 0, 100000 do out[#out + 1] = date(d) end "
                "return table.concat(out, ' ')"
            )
            reply = await client.eval(script, 0)
            assert isinstance(reply, bytes)
            return reply.split()
        finally:
            await client.aclose()

    got = asyncio.run(go())
    want = [time.strftime("%Y-%m-%d", time.gmtime(d * DAY)).encode() for d in range(100_001)]
    assert got == want


def skewed(seconds: float) -> Callable[[], float]:
    """A worker's wall clock, `seconds` ahead of the machine's (behind if negative)."""
    return lambda: time.time() + seconds


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ttl=st.sampled_from([3600, 5400, DAY, 7 * DAY]),
    skews=st.lists(st.floats(-30 * DAY, 30 * DAY), min_size=2, max_size=3),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["claim", "claim", "seen", "seen", "day", "lose registry"]),
            st.integers(0, 2),  # the worker
            st.lists(st.integers(0, 39), min_size=1, max_size=12, unique=True),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_workers_with_skewed_clocks_agree_on_every_key(
    redis_url: str,
    uid: str,
    ttl: int,
    skews: list[float],
    ops: list[tuple[str, int, list[int]]],
) -> None:
    """Workers whose clocks are up to 30 days apart (minutes, hours: anything), sharing one
    Redis on its real clock: a key claimed by any of them, or by a worker of the day layout
    before, is seen by every one, and no other key is; deleting the registry key (eviction,
    a FLUSH, a failover) loses nothing. (A test lasts seconds: every claim is within its TTL.)"""
    universe = digests(f"{uid}{ttl}{skews}", 40)

    async def go() -> None:
        client = redis_client(redis_url)
        prefix = f"skew_{uuid4().hex[:10]}"
        workers = [RedisIdempotencyStore(client, ttl, prefix, skewed(s)) for s in skews]
        claimed: set[int] = set()
        try:
            for op, w, picks in ops:
                store = workers[w % len(workers)]
                keys = [universe[i] for i in picks]
                if op == "seen":
                    assert await store.seen(keys) == [i in claimed for i in picks], op
                elif op == "lose registry":
                    await client.delete(store.registry)
                else:
                    if op == "claim":
                        await store.claim(keys)
                    else:  # a worker of the day layout, on a right clock
                        await day_claim(client, store, keys, time.time(), 20, ttl)
                    claimed.update(picks)
            for store in workers:
                assert await store.seen(universe) == [i in claimed for i in range(40)]
        finally:
            await drop(client, prefix)

    asyncio.run(go())


async def test_losing_the_registry_loses_no_key_and_no_width(
    rclient: aioredis.Redis, uid: str
) -> None:
    """The registry key deleted mid-bucket and again after the next bucket opened: the current
    bucket and the one before are still probed (by name, width from `<bucket>w`), and a claim
    that finds its bucket unlisted lists it again at the width it had, not a new one (keys
    claimed before would sit in shards nobody probes)."""
    prefix = f"idem_{uid}"
    week = 7 * DAY
    now = [(time.time() // week + 1) * week + 3600]  # an hour into next week's bucket
    store = RedisIdempotencyStore(rclient, prefix=prefix, server_clock=lambda: now[0])
    start = store.bucket_start(now[0])
    before = store.bucket_prefix(start - week)
    await rclient.set(before + "n", 300)  # 300 claims a week before: 1 hex digit of shard
    await rclient.hset(store.registry, before, f"{start - week} {start + TTL} 6 {start - week}")
    a, b, c = (digests(f"{uid}{t}", 300) for t in "abc")

    async def width(bucket_start: int) -> int:
        meta = await rclient.hget(store.registry, store.bucket_prefix(bucket_start))
        assert meta is not None
        return int(meta.split()[2])

    await store.claim(a)
    assert await width(start) == 1
    await rclient.delete(store.registry)
    assert await store.seen(a + b) == [True] * 300 + [False] * 300
    await store.claim(b)  # lists the bucket again, at its width
    assert await width(start) == 1
    assert await store.seen(a + b) == [True] * 600
    now[0] += week  # the next bucket: a and b are an hour short of their TTL
    await rclient.delete(store.registry)
    assert await store.seen(a + b + c) == [True] * 600 + [False] * 300
    await store.claim(c)  # sized by the bucket before, found by its `w` though unlisted
    assert await width(start + week) == 2  # 600 claims in the bucket before: 2 hex digits
    await rclient.delete(store.registry)
    assert await store.seen(a + b + c) == [True] * 900
    assert (await store.stats())["keys"] == 900  # the counters of both buckets, by name


async def test_health_shows_the_workers_clock_skew(rclient: aioredis.Redis, uid: str) -> None:
    fast = RedisIdempotencyStore(rclient, prefix=f"idem_{uid}", clock=lambda: time.time() + 7200)
    health = await fast.health()
    assert health["connected"] is True
    assert 7200 - 30 < health["clock_skew_s"] < 7200 + 30


async def test_a_bucket_opened_before_its_width_key_gets_one(
    rclient: aioredis.Redis, uid: str
) -> None:
    """A bucket opened by the code before `<bucket>w` (its registry entry alone, with or without
    the opening time): the next claim writes `w` with the registry's width, so losing the
    registry afterwards loses no key."""
    prefix = f"idem_{uid}"
    now = [time.time() + 60]
    store = RedisIdempotencyStore(rclient, prefix=prefix, server_clock=lambda: now[0])
    start = store.bucket_start(now[0])
    bucket = store.bucket_prefix(start)
    keys = digests(uid, 200)
    for meta in (f"{start} {start + 14 * DAY} 2 {start}", f"{start} {start + 14 * DAY} 3"):
        await rclient.delete(store.registry, f"{bucket}w")
        await rclient.hset(store.registry, bucket, meta)
        await store.claim(keys[:100])
        assert await rclient.get(f"{bucket}w") == " ".join(meta.split()[2:]).encode()
        assert TTL - 60 < await rclient.ttl(f"{bucket}w") <= 2 * TTL
        await rclient.delete(store.registry)
        await store.claim(keys[100:])  # lists the bucket again at its width
        assert await rclient.hget(store.registry, bucket) == meta.encode()
        assert await store.seen(keys) == [True] * 200
        await rclient.delete(*[k async for k in rclient.scan_iter(match=f"{bucket}*")])


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    protocol=st.sampled_from([2, 3]),
    bits=st.sampled_from([4, 24]),
    claimers=st.lists(
        st.lists(st.integers(0, 79), min_size=1, max_size=80, unique=True),
        min_size=2,
        max_size=5,
    ),
    probe=st.lists(st.integers(0, 79), min_size=1, max_size=80),
)
def test_concurrent_claimers_add_each_key_once_and_lookups_see_exactly_the_claimed(
    redis_url: str,
    uid: str,
    protocol: int,
    bits: int,
    claimers: list[list[int]],
    probe: list[int],
) -> None:
    """Several workers (each its own client and connections) claim overlapping keys at once:
    every key is added by exactly one of them (the bucket's counter = distinct keys), and a
    lookup, over RESP2 or RESP3, in a bucket
    before (3 h before: a second live bucket) and the current one, answers exactly the claimed
    keys, in the order asked, duplicates included."""
    universe = digests(f"{uid}{protocol}{bits}", 80)

    async def go() -> None:
        prefix = f"conc_{uuid4().hex[:10]}"
        # 2 h into this week's bucket; the claims before 3 h earlier, in the bucket before
        now = RedisIdempotencyStore(aioredis.Redis()).bucket_start(time.time()) + 7200.0
        clients = [
            aioredis.Redis.from_url(redis_url, protocol=protocol) for _ in range(len(claimers))
        ]
        stores = [
            RedisIdempotencyStore(c, prefix=prefix, shard_bits=bits, server_clock=lambda: now)
            for c in clients
        ]
        old = RedisIdempotencyStore(
            clients[0], prefix=prefix, shard_bits=bits, server_clock=lambda: now - 3 * 3600
        )
        try:
            await old.claim(universe[60:70])  # a live bucket before, probed too
            await asyncio.gather(
                *(
                    s.claim([universe[i] for i in picks])
                    for s, picks in zip(stores, claimers, strict=True)
                )
            )
            distinct = {i for picks in claimers for i in picks}
            counter = await clients[0].get(
                stores[0].bucket_prefix(stores[0].bucket_start(now)) + "n"
            )
            assert int(counter) == len(distinct)
            want = [i in distinct or 60 <= i < 70 for i in probe]
            got = await asyncio.gather(*(s.seen([universe[i] for i in probe]) for s in stores))
            assert got == [want] * len(stores)
        finally:
            for c in clients[1:]:
                await c.aclose()
            await drop(clients[0], prefix)

    asyncio.run(go())


@pytest.mark.parametrize("protocol", [2, 3])
async def test_an_error_reply_in_a_lookup_is_store_unavailable_and_spoils_no_connection(
    redis_url: str, uid: str, protocol: int
) -> None:
    """An error in a lookup (a shard key of the wrong type) surfaces as StoreUnavailable, and
    spoils no pooled connection: the next lookups answer right, over every one of them."""
    client = aioredis.Redis.from_url(redis_url, protocol=protocol)
    prefix = f"err_{uid}"
    store = RedisIdempotencyStore(client, prefix=prefix, shard_bits=8)
    keys = digests(uid, 40)
    try:
        await store.claim(keys[:20])
        used = {k.hex()[:2] for k in keys[:20]}
        shard = next(k.hex()[:2] for k in keys[20:] if k.hex()[:2] not in used)
        bad = store.bucket_prefix(store.bucket_start(time.time())) + shard
        await client.set(bad, "not a hash")
        with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
            await store.seen(keys)
        await client.delete(bad)
        for _ in range(3):
            got = await asyncio.gather(*(store.seen(keys) for _ in range(4)))
            want = [k in set(keys[:20]) for k in keys]
            assert got == [want] * 4
    finally:
        await drop(client, prefix)


def _fewest(rate: float, width: int, most: int, span: int) -> int:
    """The sizing rule: the fewest hex digits (>= width) giving ~32 keys a hash at `rate`."""
    while width < most and rate * span > 32 * 16**width:
        width += 1
    return width


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@example(grow=0, ops=[("drop", 0.0, 1)])  # official CI drew it: nothing claimed, no keys
@given(
    grow=st.sampled_from([0, 700, 2500]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["claim", "claim", "claim", "drop"]),
            st.floats(0, 2 * DAY),  # seconds the clock moves first
            st.integers(1, 1500),  # new keys claimed
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_buckets_grow_wider_parts_by_the_model_and_every_claimed_key_stays_seen(
    redis_url: str, uid: str, grow: int, ops: list[tuple[str, float, int]]
) -> None:
    """The sizing rule against a model, over weeks: a bucket with a measured one before opens
    at the fewest hex digits giving ~32 keys a hash at that rate, any other at the first width
    (made in the hashtable encoding); when a bucket's count passes max(64 keys a hash of its
    newest part, `grow_keys`) claims go on in a wider part, sized by the bucket's own rate so
    far. Meanwhile every key claimed within the TTL is seen, none never claimed is, also
    after the registry is deleted (`drop`: the parts are kept in `<bucket>w`); each bucket's
    counter is its distinct keys (batches hold duplicates) and every key has an expiry."""
    span, most, first = 7 * DAY, 2, 1  # shard_bits 8, first_shard_bits 4

    async def go() -> None:
        client = redis_client(redis_url)
        prefix = f"grow_{uuid4().hex[:10]}"
        now = [(time.time() // span + 1) * span + 60.5]
        store = RedisIdempotencyStore(
            client,
            prefix=prefix,
            shard_bits=8,
            first_shard_bits=4,
            grow_keys=grow,
            server_clock=lambda: now[0],
        )
        model: dict[int, dict[str, Any]] = {}  # bucket start -> widths, opened, total
        claimed: list[tuple[bytes, float]] = []
        fresh = digests(f"{prefix}-fresh", 100)
        try:
            for i, (op, dt, n) in enumerate(ops):
                now[0] += dt
                if op == "drop":
                    await client.delete(store.registry)
                    continue
                keys = digests(f"{prefix}-{i}", n)
                await store.claim(keys + keys[: n // 3])  # a third twice in the batch
                claimed.extend((k, now[0]) for k in keys)
                start = store.bucket_start(now[0])
                if start not in model:
                    prev = model.get(start - span)
                    covered = start - prev["opened"] if prev else 0
                    width = (
                        _fewest(prev["total"] / covered, 1, most, span)
                        if prev and covered >= span / 8
                        else min(first, most)
                    )
                    model[start] = {"widths": [width], "opened": now[0] // 1, "total": 0}
                b = model[start]
                b["total"] += n
                width = b["widths"][-1]
                if width < most and b["total"] > max(64 * 16**width, grow):
                    rate = b["total"] / max(now[0] - b["opened"], 1)
                    b["widths"].append(_fewest(rate, width + 1, most, span))
                meta = await client.hget(store.registry, store.bucket_prefix(start))
                assert meta is not None
                want = "".join(map(str, b["widths"]))
                assert meta.split()[2].decode() == want, (meta, b)
                saved = await client.get(store.bucket_prefix(start) + "w")
                assert saved is not None and saved.split()[0].decode() == want
                assert int(await client.get(store.bucket_prefix(start) + "n")) == b["total"]
            live = [at // 3600 * 3600 + 3600 + TTL > now[0] for _, at in claimed]
            assert await store.seen([k for k, _ in claimed]) == live
            assert await store.seen(fresh) == [False] * len(fresh)
            await client.delete(store.registry)
            assert await store.seen([k for k, _ in claimed]) == live
            names = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
            assert bool(names) == bool(claimed)  # ops of registry drops alone claim nothing
            assert all([await client.ttl(k) > 0 for k in names])  # all expire
        finally:
            await drop(client, prefix)

    asyncio.run(go())
