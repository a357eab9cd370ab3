"""Checkpoints and idempotency keys on Redis (redis-py asyncio).

Checkpoints are one plain string key each, `checkpoint:<tenant>:<source>`, holding JSON an
operator reads with `redis-cli GET` and resets with `redis-cli DEL`.

Idempotency keys must be compact: a plain key named by a hex SHA-256 costs ~186 bytes, which is
~112 GB for 7 days at 1,000 records/s. So digests live as fields of small hashes instead:

    key   ingest_idempotency:<YYYY-MM-DD>:<shard>   day of the claim (UTC); shard = the digest's
                                                   first `shard_bits` bits (20: 5 hex digits)
    field digest bytes 3..12 (10 bytes, binary)    with the shard: 100 bits of the digest
    value the claim's hour of day (0..23)          one listpack byte; lets `seen` honour the TTL
                                                   to the hour although the hash expires by day
    field "" (empty), value ""                     marker, ~4 bytes per hash: HSET of a claim
                                                   also sets it, and answers 2 only when the
                                                   hash is new, so only new hashes pay EXPIREAT
    ingest_idempotency:<YYYY-MM-DD>:n              number of keys claimed that day (for stats)

Every hash gets EXPIREAT = end of its day + ttl, so no per-key TTL is stored; a claim sets it
in the same script call that creates the hash. Hashes written before the marker existed (same
names, fields and values) are read as they are and get the marker, and the same EXPIREAT
again, at their next claim; that claim also counts one key in the day's `n` counter even if
its key was already there (stats only: at most one extra per old hash, on the upgrade day).
With the default 2^20 shards a hash stays under Redis's default
`hash-max-listpack-entries` (128) up to ~133M claims a day (~1,550/s sustained), and so keeps
the compact listpack encoding (~14 bytes per field); beyond that raise `shard_bits` (whole hex
digits: 24) or the listpack limit in redis.conf. A false "seen" needs two digests equal in 100
bits: ~N/2^100 per lookup, negligible.

`seen` is one EVALSHA per batch (a Lua script checks every live day server-side, newest first);
`claim` is one EVALSHA too: per key one HSET, plus an EXPIREAT for a hash it created. The
client sends the keys' prefixes once raw and once in hex (one C pass each), so a script only
cuts strings per key and never formats a shard name. Redis errors become `StoreUnavailable` so
the worker waits and retries; the connection pool reconnects by itself after a Redis restart,
and redis-py reloads the scripts when the restarted server answers NOSCRIPT.
"""

from __future__ import annotations

import binascii
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ingest.errors import StoreUnavailable
from ingest.state.base import checkpoint_key, checkpoint_value
from ingest.timefmt import iso

DAY = 86_400

_SEEN_LUA = """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local nb, width = tonumber(ARGV[3]), tonumber(ARGV[4])
local prefixes, limits = {}, {}  -- live days only: a missing day costs one EXISTS per batch
for j = 0, nb - 1 do
  if redis.call('EXISTS', ARGV[5 + j] .. 'n') == 1 then
    prefixes[#prefixes + 1] = ARGV[5 + j]
    -- seen while day start + (hour + 1) * 3600 + ttl > now, i.e. (hour + 1) * 3600 > limit
    limits[#limits + 1] = now - tonumber(ARGV[5 + nb + j]) - ttl
  end
end
local live = #prefixes
local hex, blob = ARGV[5 + 2 * nb], ARGV[6 + 2 * nb]  -- the keys' 13-byte prefixes: hex, raw
local sub, call = string.sub, redis.call
local out, n, h = {}, 0, 1
for i = 1, #blob, 13 do
  local shard, field = sub(hex, h, h + width - 1), sub(blob, i + 3, i + 12)
  local hit = 0
  for d = 1, live do
    local hour = call('HGET', prefixes[d] .. shard, field)
    if hour and (tonumber(hour) + 1) * 3600 > limits[d] then
      hit = 1
      break
    end
  end
  n = n + 1
  out[n] = hit
  h = h + 26
end
return table.concat(out)  -- one bulk string of '0'/'1': one reply to parse, not one per key
"""

_CLAIM_LUA = """
local prefix, hour, expire_at, width = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local hex, blob = ARGV[5], ARGV[6]  -- the keys' 13-byte prefixes: hex (shard), raw (field)
local sub, call = string.sub, redis.call
local added, h = 0, 1
for i = 1, #blob, 13 do
  local key = prefix .. sub(hex, h, h + width - 1)
  -- the empty marker field is new only in a hash this call created (or one from before the
  -- marker existed): only those need their EXPIREAT, every other hash has it already
  local n = call('HSET', key, '', '', sub(blob, i + 3, i + 12), hour)
  if n == 2 then call('EXPIREAT', key, expire_at) end
  if n > 0 then added = added + 1 end
  h = h + 26
end
local counter = prefix .. 'n'
redis.call('INCRBY', counter, added)
redis.call('EXPIREAT', counter, expire_at)
return added
"""


def redis_client(url: str) -> aioredis.Redis:
    """A client that fails fast (2 s connect) and retries connection errors a few times, so a
    short Redis restart is absorbed and a long outage surfaces as StoreUnavailable."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError, OSError],
    )


def _prefixes(keys: Sequence[bytes]) -> tuple[bytes, bytes]:
    """The keys' 13-byte prefixes as hex and raw, each in one C-speed pass: the scripts cut a
    shard name (the first `width` hex digits) and a field (raw bytes 3..12) per key with two
    `string.sub`s instead of computing them."""
    raw = b"".join([k[:13] for k in keys])
    return binascii.hexlify(raw), raw


def _where(client: aioredis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


@asynccontextmanager
async def _guard(client: aioredis.Redis) -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreUnavailable("redis", _where(client), f"{type(exc).__name__}: {exc}") from exc


class RedisCheckpointStore:
    """CheckpointStore on plain string keys an operator can GET and DEL by hand."""

    def __init__(self, client: aioredis.Redis, worker: str) -> None:
        self._r = client
        self._worker = worker

    key = staticmethod(checkpoint_key)

    async def load(self, tenant: str, source: str) -> dict[str, Any] | None:
        async with _guard(self._r):
            raw = await self._r.get(self.key(tenant, source))
        if raw is None:
            return None
        position = orjson.loads(raw).get("position")
        return dict(position) if isinstance(position, dict) else None

    async def save(self, tenant: str, source: str, position: Mapping[str, Any]) -> None:
        value = checkpoint_value(tenant, source, position, iso(time.time()), self._worker)
        async with _guard(self._r):
            await self._r.set(self.key(tenant, source), value)

    async def delete(self, tenant: str, source: str) -> None:
        async with _guard(self._r):
            await self._r.delete(self.key(tenant, source))


class RedisIdempotencyStore:
    """IdempotencyStore on day-bucketed, sharded hashes (layout in the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        ttl_seconds: int = 7 * DAY,
        prefix: str = "ingest_idempotency",
        clock: Callable[[], float] = time.time,
        shard_bits: int = 20,
    ) -> None:
        if shard_bits not in range(4, 25, 4):
            raise ValueError("shard_bits must be one of 4, 8, ..., 24 (whole hex digits)")
        self._r = client
        self._ttl = ttl_seconds
        self._prefix = prefix
        self._clock = clock
        self._width = shard_bits // 4
        self._seen = client.register_script(_SEEN_LUA)
        self._claim = client.register_script(_CLAIM_LUA)

    def bucket_prefix(self, day: int) -> str:
        """`ingest_idempotency:2026-01-31:` for day number `day` (days since the epoch)."""
        date = datetime.fromtimestamp(day * DAY, UTC).strftime("%Y-%m-%d")
        return f"{self._prefix}:{date}:"

    def live_days(self, now: float) -> list[int]:
        """Days whose hash may still hold unexpired claims, newest first."""
        today = int(now // DAY)
        oldest = int((now - self._ttl) // DAY)
        return list(range(today, oldest - 1, -1))

    async def seen(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        now = self._clock()
        days = self.live_days(now)
        args: list[Any] = [now, self._ttl, len(days), self._width]
        args += [self.bucket_prefix(d) for d in days]
        args += [d * DAY for d in days]
        args += _prefixes(keys)
        async with _guard(self._r):
            hits = await self._seen(args=args)
        return [h == 49 for h in hits]  # b"1"

    async def claim(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        now = self._clock()
        day = int(now // DAY)
        hour = int(now - day * DAY) // 3600
        expire_at = (day + 1) * DAY + self._ttl
        args: list[Any] = [self.bucket_prefix(day), hour, expire_at, self._width]
        args += _prefixes(keys)
        async with _guard(self._r):
            await self._claim(args=args)

    async def stats(self) -> dict[str, Any]:
        """Totals from the per-day counters (INFO keyspace cannot show fields inside hashes)."""
        now = self._clock()
        days = self.live_days(now)
        async with _guard(self._r):
            counts = await self._r.mget([self.bucket_prefix(d) + "n" for d in days])
            info = await self._r.info("memory")
        live = [(d, int(c)) for d, c in zip(days, counts, strict=True) if c is not None]
        keys = sum(c for _, c in live)
        used = int(info["used_memory"])
        base = used - int(info.get("used_memory_startup", 0))
        return {
            "backend": "redis",
            "keys": keys,
            "memory_bytes": used,
            "bytes_per_key": round(base / keys, 1) if keys else None,
            "buckets": len(live),
            "oldest_bucket": iso(min(d for d, _ in live) * DAY) if live else None,
            "ttl_seconds": self._ttl,
        }

    async def health(self) -> dict[str, Any]:
        try:
            async with _guard(self._r):
                t0 = time.perf_counter()
                await self._r.ping()
                ms = (time.perf_counter() - t0) * 1000
        except StoreUnavailable as exc:
            return {"connected": False, "target": _where(self._r), "error": exc.cause}
        return {"connected": True, "target": _where(self._r), "ping_ms": round(ms, 2)}
