"""Checkpoints and idempotency keys on Redis (redis-py asyncio).

Checkpoints are one plain string key each, `checkpoint:<tenant>:<source>`, holding JSON an
operator reads with `redis-cli GET` and resets with `redis-cli DEL`.

Idempotency keys must be compact: a plain key named by a hex SHA-256 costs ~186 bytes, which is
~112 GB for 7 days at 1,000 records/s. So digests live as fields of small hashes, in buckets as
wide as the TTL (whole days, D = ceil(ttl / 1 day); 7 by default), so that a lookup probes at
most two buckets (the current one and the one before) instead of one per day of the window:

    key   ingest_idempotency:<YYYY-MM-DD>+<D>d:<shard>   bucket starting that day (UTC, days
                                    since the epoch divisible by D); shard = the digest's first
                                    1-6 hex digits, sized per bucket (below)
    field digest bytes 3..12 (10 bytes, binary)
    value the claim's hour in the bucket (0..24*D-1), so `seen` honours the TTL to the hour
          although the hash expires by bucket
    field "" (empty), value ""      marker, ~4 bytes per hash: HSET of a claim also sets it and
                                    answers 2 only when the hash is new, so only new hashes pay
                                    EXPIREAT (= end of the bucket + ttl)
    ingest_idempotency:<YYYY-MM-DD>+<D>d:n    number of keys claimed into the bucket (stats)
    ingest_idempotency:buckets      hash: bucket prefix -> "<start> <expire_at> <shard hex
                                    digits> <opened at>", one entry per live bucket, written by
                                    the claim that opens a bucket (which drops expired ones)

A lookup reads the registry (one HGETALL per batch) and probes every live bucket in it, newest
first, so buckets of another width (a changed TTL, a worker with another `shard_bits`) are
found too: a bucket's shard width is fixed by the claim that opened it. Wider buckets keep a
key up to one bucket longer than the TTL in memory (between TTL and 2 x TTL, ~1.5 x on
average, against ~8/7 with day buckets); `seen` still answers by the claim's hour, so what is
seen is exactly what it was with day buckets. The claim that opens a bucket sizes its shards
by the bucket before (its count over the time it was open, if that was >= 1/8 of a bucket):
the fewest hex digits that give ~32 keys a hash, so a hash keeps the compact listpack
encoding (~14 bytes per field, <= `hash-max-listpack-entries`, 128 by default) up to 4x that
rate, and few keys pay a hash of their own (~150 bytes) at low rates; at most `shard_bits`
(24 by default, 20 for D = 1), which is also the width of a first bucket. 2^24 shards hold
~2.1G claims a bucket in listpacks (~3,500/s sustained at 7 days); beyond that raise the
listpack limit in redis.conf. A false "seen" needs a digest equal in its 80 field bits to
one of the ~32 in its hash: ~2^-75 per lookup.

The layout before (day buckets, `ingest_idempotency:<YYYY-MM-DD>:<5 hex digits>` with the hour
of the day and `ingest_idempotency:<YYYY-MM-DD>:n`) is still read, as long as a day's counter
exists (an EXISTS per live day per batch), so keys claimed before an upgrade are seen until
they expire; nothing writes it any more. Upgrade every worker that shares a Redis together: an
old worker does not read the new buckets.

`seen` is one EVALSHA per batch (a Lua script checks the live buckets server-side); `claim` is
one EVALSHA too: per key one HSET, plus an EXPIREAT for a hash it created. The client sends the
keys' prefixes once raw and once in hex (one C pass each), so a script only cuts strings per key
and never formats a shard name. Redis errors become `StoreUnavailable` so the worker waits and
retries; the connection pool reconnects by itself after a Redis restart, and redis-py reloads
the scripts when the restarted server answers NOSCRIPT.
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
local now, ttl, registry = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local nb, old_width = tonumber(ARGV[4]), tonumber(ARGV[5])
local order, starts = {}, {}
local entries = redis.call('HGETALL', registry)
for i = 1, #entries, 2 do
  local s, e, w = string.match(entries[i + 1], '^(%d+) (%d+) (%d+)')
  if tonumber(e) > now then  -- a bucket whose every claim is past the TTL is not probed
    order[#order + 1] = {entries[i], tonumber(s), tonumber(w)}
  end
end
table.sort(order, function(a, b) return a[2] > b[2] end)  -- newest first
local prefixes, limits, widths = {}, {}, {}
for d = 1, #order do
  -- seen while start + (hour + 1) * 3600 + ttl > now, i.e. (hour + 1) * 3600 > limit
  prefixes[d], limits[d], widths[d] = order[d][1], now - order[d][2] - ttl, order[d][3]
end
for j = 0, nb - 1 do  -- day buckets of the layout before: read until they expire
  if redis.call('EXISTS', ARGV[6 + j] .. 'n') == 1 then
    prefixes[#prefixes + 1] = ARGV[6 + j]
    limits[#limits + 1] = now - tonumber(ARGV[6 + nb + j]) - ttl
    widths[#widths + 1] = old_width
  end
end
local live = #prefixes
local hex, blob = ARGV[6 + 2 * nb], ARGV[7 + 2 * nb]  -- the keys' 13-byte prefixes: hex, raw
local sub, call = string.sub, redis.call
local out, n, h = {}, 0, 1
for i = 1, #blob, 13 do
  local field = sub(blob, i + 3, i + 12)
  local hit = 0
  for d = 1, live do
    local hour = call('HGET', prefixes[d] .. sub(hex, h, h + widths[d] - 1), field)
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
local registry, prefix, start, hour = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local expire_at, width, now = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local prev, span = ARGV[8], tonumber(ARGV[9])  -- the bucket before this one, the buckets' length
local hex, blob = ARGV[10], ARGV[11]  -- the keys' 13-byte prefixes: hex (shard), raw (field)
local call, match = redis.call, string.match
local meta = call('HGET', registry, prefix)
local known, opened = nil, math.floor(now)
if meta then
  local e, w, o = match(meta, '^%d+ (%d+) (%d+) ?(%d*)$')  -- (1fa79dc wrote no opening time)
  known, width = tonumber(e), tonumber(w)  -- the width that opened the bucket
  if o ~= '' then opened = o end
else
  -- size the shards by the bucket before: ~32 keys a hash at its rate, so a hash stays in
  -- the listpack encoding (<= 128 fields) up to 4x that rate; `width` is the most allowed
  local pm = call('HGET', registry, prev)
  local ps, po, covered = nil, nil, 0
  if pm then ps, po = match(pm, '^(%d+) %d+ %d+ (%d+)$') end
  if po then covered = tonumber(ps) + span - tonumber(po) end  -- seconds it was open
  if covered >= span / 8 then
    local rate = tonumber(call('GET', prev .. 'n') or '0') / covered
    local w = 1
    while w < width and rate * span > 32 * 16 ^ w do w = w + 1 end
    width = w
  end
end
if not known or known < expire_at then
  -- opening a bucket (or a longer TTL): drop expired entries, keep the registry to the last
  local top = expire_at
  local entries = call('HGETALL', registry)
  for i = 1, #entries, 2 do
    local e = tonumber(match(entries[i + 1], '^%d+ (%d+)'))
    if e <= now then call('HDEL', registry, entries[i]) elseif e > top then top = e end
  end
  call('HSET', registry, prefix, start .. ' ' .. expire_at .. ' ' .. width .. ' ' .. opened)
  call('EXPIREAT', registry, top)
end
local sub = string.sub
local added, h = 0, 1
for i = 1, #blob, 13 do
  local key = prefix .. sub(hex, h, h + width - 1)
  -- the empty marker field is new only in a hash this call created: only those need their
  -- EXPIREAT, every other hash has it already
  local n = call('HSET', key, '', '', sub(blob, i + 3, i + 12), hour)
  if n == 2 then call('EXPIREAT', key, expire_at) end
  if n > 0 then added = added + 1 end
  h = h + 26
end
local counter = prefix .. 'n'
call('INCRBY', counter, added)
call('EXPIREAT', counter, expire_at)
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
    """IdempotencyStore on TTL-wide, sharded hashes (layout in the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        ttl_seconds: int = 7 * DAY,
        prefix: str = "ingest_idempotency",
        clock: Callable[[], float] = time.time,
        shard_bits: int | None = None,
        old_shard_bits: int = 20,
    ) -> None:
        self.bucket_days = max(1, -(-ttl_seconds // DAY))
        bits = (20 if self.bucket_days == 1 else 24) if shard_bits is None else shard_bits
        for b in (bits, old_shard_bits):
            if b not in range(4, 25, 4):
                raise ValueError("shard_bits must be one of 4, 8, ..., 24 (whole hex digits)")
        self._r = client
        self._ttl = ttl_seconds
        self._prefix = prefix
        self._clock = clock
        self._width = bits // 4
        self._old_width = old_shard_bits // 4
        self.registry = f"{prefix}:buckets"
        self._seen = client.register_script(_SEEN_LUA)
        self._claim = client.register_script(_CLAIM_LUA)

    def bucket_start(self, now: float) -> int:
        """Start (epoch seconds, UTC midnight) of the bucket a claim at `now` goes into."""
        width = self.bucket_days * DAY
        return int(now // width) * width

    def bucket(self, now: float) -> tuple[int, int, int]:
        """(start, hour in the bucket, EXPIREAT) of a claim at `now`: the hash outlives the
        claim's hour + ttl, and only this bucket and the one before can hold a live claim."""
        start = self.bucket_start(now)
        return start, int(now - start) // 3600, start + self.bucket_days * DAY + self._ttl

    def bucket_prefix(self, start: int) -> str:
        """`ingest_idempotency:2026-01-29+7d:` for the bucket starting at `start`."""
        date = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d")
        return f"{self._prefix}:{date}+{self.bucket_days}d:"

    def day_prefix(self, day: int) -> str:
        """`ingest_idempotency:2026-01-31:`, day bucket `day` of the layout before (read only)."""
        date = datetime.fromtimestamp(day * DAY, UTC).strftime("%Y-%m-%d")
        return f"{self._prefix}:{date}:"

    def live_days(self, now: float) -> list[int]:
        """Days whose day bucket (layout before) may still hold unexpired claims, newest first."""
        today = int(now // DAY)
        oldest = int((now - self._ttl) // DAY)
        return list(range(today, oldest - 1, -1))

    async def seen(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        now = self._clock()
        days = self.live_days(now)
        args: list[Any] = [now, self._ttl, self.registry, len(days), self._old_width]
        args += [self.day_prefix(d) for d in days]
        args += [d * DAY for d in days]
        args += _prefixes(keys)
        async with _guard(self._r):
            hits = await self._seen(args=args)
        return [h == 49 for h in hits]  # b"1"

    async def claim(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        now = self._clock()
        start, hour, expire_at = self.bucket(now)
        prefix = self.bucket_prefix(start)
        span = self.bucket_days * DAY
        args: list[Any] = [self.registry, prefix, start, hour, expire_at, self._width, now]
        args += [self.bucket_prefix(start - span), span]
        args += _prefixes(keys)
        async with _guard(self._r):
            await self._claim(args=args)

    async def _live_buckets(self, now: float) -> list[tuple[str, int]]:
        """(prefix, start) of every live bucket: the registry's and the old layout's days."""
        async with _guard(self._r):
            entries = await self._r.hgetall(self.registry)
        live = []
        for name, meta in entries.items():
            start, expire_at = meta.split()[:2]
            if int(expire_at) > now:
                live.append((name.decode() if isinstance(name, bytes) else name, int(start)))
        live += [(self.day_prefix(d), d * DAY) for d in self.live_days(now)]
        return live

    async def stats(self) -> dict[str, Any]:
        """Totals from the per-bucket counters (INFO keyspace cannot show fields in hashes)."""
        now = self._clock()
        buckets = await self._live_buckets(now)
        async with _guard(self._r):
            counts = await self._r.mget([p + "n" for p, _ in buckets])
            info = await self._r.info("memory")
        live = [(s, int(c)) for (_, s), c in zip(buckets, counts, strict=True) if c is not None]
        keys = sum(c for _, c in live)
        used = int(info["used_memory"])
        base = used - int(info.get("used_memory_startup", 0))
        return {
            "backend": "redis",
            "keys": keys,
            "memory_bytes": used,
            "bytes_per_key": round(base / keys, 1) if keys else None,
            "buckets": len(live),
            "oldest_bucket": iso(min(s for s, _ in live)) if live else None,
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
