"""Checkpoints and idempotency keys on Redis (redis-py asyncio).

Checkpoints are one plain string key each, `checkpoint:<tenant>:<source>`, holding JSON an
operator reads with `redis-cli GET` and resets with `redis-cli DEL`.

Idempotency keys must be compact: a plain key named by a hex SHA-256 costs ~186 bytes, which is
~112 GB for 7 days at 1,000 records/s. So digests live as fields of small hashes, in buckets as
wide as the TTL (whole days, D = ceil(ttl / 1 day); 7 by default), so that a lookup probes at
most two buckets (the current one and the one before) instead of one per day of the window:

    key   ingest_idempotency:<YYYY-MM-DD>+<D>d:<shard>   bucket starting that day (UTC, days
                                    since the epoch divisible by D); shard = the digest's first
                                    1-6 hex digits, one width per part of the bucket (below)
    field digest bytes 3..12 (10 bytes, binary)
    value the claim's hour in the bucket (0..24*D-1), so `seen` honours the TTL to the hour
          although the hash expires by bucket
    field "" (empty), value ""      marker, ~4 bytes per hash: HSET of a claim also sets it and
                                    answers 2 only when the hash is new, so only new hashes pay
                                    EXPIREAT (= end of the bucket + D days: what the longest
                                    TTL of that width needs, so raising the TTL within D days
                                    holds for keys already claimed; set once, never extended);
                                    a first bucket's hashes get it when the bucket opens
    ingest_idempotency:<YYYY-MM-DD>+<D>d:n    number of keys claimed into the bucket (stats)
    ingest_idempotency:<YYYY-MM-DD>+<D>d:w    "<widths> <opened at>" of the bucket (expires
                                    with it): widths = the shard hex digits of each part, one
                                    digit a part, oldest first ("2", "26"), should the registry
                                    be lost
    ingest_idempotency:buckets      hash: bucket prefix -> "<start> <expire_at> <widths>
                                    <opened at>", one entry per live bucket, written by the
                                    claim that opens a bucket (which drops expired ones) and by
                                    the one that opens a wider part

One clock: what has expired, which bucket a claim goes into and its hour are decided inside
the scripts by Redis's own `TIME` (Redis 7 replicates a script's effects, so TIME is allowed
before writes), never by a worker's clock: a worker whose clock runs fast would otherwise drop
the registry entry of the bucket before for every worker, and one running slow would store
hours (and EXPIREATs) already past, so a duplicate delivered to another worker would pass.
The scripts format the bucket names themselves from that time. `health()` shows each worker's
skew against Redis (`clock_skew_s`) for the operator; it changes nothing.

Registry loss: a lookup also probes the current bucket and the one before by name (from
Redis's clock and this store's D) when the registry does not list them, at the widths in their
`w` key (one GET each, only then); a claim that finds its bucket unlisted lists it again with
those widths instead of opening it anew. Every claim batch writes `w` if missing (SET NX), so
buckets opened before `w` existed get one too. Keys of another width (another TTL) are found
only through the registry. Redis must run with `maxmemory-policy noeviction`: an evicted
shard hash loses its keys whatever the registry says, and every other policy may evict one
(volatile-* ones pick keys with an expiry, which all of these have); with noeviction a full
Redis refuses the claim (OOM), which is StoreUnavailable: the worker waits, nothing is lost.

A lookup reads the registry (one HGETALL per batch) and probes every part of every live bucket
in it, newest first, so buckets of another width (a changed TTL, a worker with another
`shard_bits`) are found too: a part's shard width is fixed by the claim that opened it. Wider
buckets keep a key up to one bucket longer than D days in memory (between D and 2 x D days,
~1.5 x on average, against ~8/7 with day buckets); `seen` still answers by the claim's hour, so
what is seen is exactly what it was with day buckets. The claim that opens a bucket sizes its
shards by the bucket before (its count over the time it was open, if that was >= 1/8 of a
bucket): the fewest hex digits that give ~32 keys a hash, so a hash keeps the compact listpack
encoding (~14 bytes per field, <= `hash-max-listpack-entries`, 128 by default) up to 4x that
rate, and few keys pay a hash of their own (~150 bytes) at low rates; at most `shard_bits`
(24 by default, 20 for D = 1). 2^24 shards hold ~2.1G claims a bucket in listpacks (~3,500/s
sustained at 7 days); beyond that raise the listpack limit in redis.conf. A false "seen" needs
a digest equal in its 80 field bits to one of the few in its hash: ~2^-75 per lookup at 32.

A bucket with nothing to size by (a deployment's first, the one after a pause, day one of every
bench) opens at `first_shard_bits` (8: 256 hashes), all made by that claim with their EXPIREAT
and a marker value longer than `hash-max-listpack-value` (64 by default), which puts them in
the hashtable encoding from the start: no claim then creates a key or pays an EXPIREAT (at the
widest shards each did, ~1.5-3 µs of Redis CPU a key) and no lookup scans a listpack of
hundreds of fields. A hashtable field costs ~64 bytes (a first bucket at 2^24 cost ~150-180
bytes a key, one hash each). Growth: when a bucket's count passes max(64 keys a hash of its
newest part, `grow_keys` = 2^22, ~270 MB of hashtable fields), the claim appends a wider part,
sized like a new bucket but by this bucket's own rate since it opened, and claims go on there;
keys already claimed stay in their part, which lookups keep probing (a part is one more HGET a
key; a first bucket of 1,000/s gets two parts, "26", about 70 minutes in). So a bucket holds
at most `grow_keys` keys in hashes that left the listpack encoding (a measured part passes 128
keys a hash only if the rate rose > 4x), then ~64 a hash on average per part outgrown, up to
`shard_bits`: nothing grows without bound.

The layout before (day buckets, `ingest_idempotency:<YYYY-MM-DD>:<5 hex digits>` with the hour
of the day and `ingest_idempotency:<YYYY-MM-DD>:n`) is still read, as long as a day's counter
exists (an EXISTS per live day per batch), so keys claimed before an upgrade are seen until
they expire; nothing writes it any more. Upgrade every worker that shares a Redis together
(stop all old workers, then start the new ones; not a rolling update): an old worker does not
read the new buckets, so a duplicate it receives of a key a new worker claimed goes through;
likewise a worker from before the parts (a single width digit) reads "26" as one width of 26.

The scripts read and write keys they are not given as KEYS (they name the buckets from
Redis's clock), so they cannot run on Redis Cluster: one Redis (with replicas) only.

`seen` is one EVALSHA per batch (a Lua script checks the live buckets' parts server-side);
`claim` is one EVALSHA too: per key one HSET, plus an EXPIREAT for a hash it created; per batch
a TIME, an HGETALL/HGET of the registry and a SET NX of `w`. The client sends the
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
# A bucket with no bucket before it to size from (a deployment's first, or after a pause)
# opens as 2^8 hashes made in the hashtable encoding, and holds at least GROW_KEYS keys
# (~64 bytes each, ~270 MB) before claims go on in a wider part (module docstring).
FIRST_SHARD_BITS = 8
GROW_KEYS = 1 << 22

# Shared by both scripts: the time every decision is made by (expiry, bucket, hour) is Redis's
# own `TIME`, one clock for every worker, unless a test stands in for it; bucket names are
# formatted here from that time (a day count to YYYY-MM-DD, Hinnant's days_from_civil inverse).
_TIME_LUA = """
local floor = math.floor
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end  -- a test's stand-in for the server's clock
  local t = redis.call('TIME')  -- allowed before writes: Redis 7 replicates scripts' effects
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function date(day)  -- days since 1970-01-01 -> 'YYYY-MM-DD' (UTC)
  local z = day + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02d', y, m, doy - floor((153 * mp + 2) / 5) + 1)
end
local function bucket(base, start, days)  -- 'ingest_idempotency:2026-11-26+7d:'
  return base .. ':' .. date(floor(start / 86400)) .. '+' .. days .. 'd:'
end
"""

_SEEN_LUA = (
    _TIME_LUA
    + """
local now, ttl, base = clock(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local days, old_width = tonumber(ARGV[4]), tonumber(ARGV[5])
local call, match = redis.call, string.match
local span = days * 86400
local current = floor(now / span) * span
local order, listed = {}, {}
local sub = string.sub
local function parts(name, s, widths)  -- one probe per part of a bucket (its widths' digits)
  for k = 1, #widths do order[#order + 1] = {name, s, tonumber(sub(widths, k, k)), k} end
end
local entries = call('HGETALL', base .. ':buckets')
for i = 1, #entries, 2 do
  listed[entries[i]] = true
  local s, e, w = match(entries[i + 1], '^(%d+) (%d+) (%d+)')
  if tonumber(e) > now then  -- a bucket whose every claim is past the TTL is not probed
    parts(entries[i], tonumber(s), w)
  end
end
-- the current bucket and the one before, by name, even if the registry lost them (evicted,
-- deleted, a replica that missed it): their widths are in `<bucket>w`, written by their claims
for s = current, current - span, -span do
  local name = bucket(base, s, days)
  if not listed[name] then
    local w = call('GET', name .. 'w')
    if w then parts(name, s, match(w, '^%d+')) end
  end
end
-- newest bucket first, and in a bucket its newest (widest) part first
table.sort(order, function(a, b) return a[2] > b[2] or (a[2] == b[2] and a[4] > b[4]) end)
local prefixes, limits, widths = {}, {}, {}
for d = 1, #order do
  -- seen while start + (hour + 1) * 3600 + ttl > now, i.e. (hour + 1) * 3600 > limit
  prefixes[d], limits[d], widths[d] = order[d][1], now - order[d][2] - ttl, order[d][3]
end
for day = floor(now / 86400), floor((now - ttl) / 86400), -1 do
  local prefix = base .. ':' .. date(day) .. ':'  -- the day layout before: read until it expires
  if call('EXISTS', prefix .. 'n') == 1 then
    prefixes[#prefixes + 1] = prefix
    limits[#limits + 1] = now - day * 86400 - ttl
    widths[#widths + 1] = old_width
  end
end
local live = #prefixes
local hex, blob = ARGV[6], ARGV[7]  -- the keys' 13-byte prefixes: hex, raw
local n = #blob / 13
-- '0' / '1' as strings: table.concat would format a number with sprintf per key
local out = {}
for i = 1, n do out[i] = '0' end
for d = 1, live do
  local w, name, limit = widths[d], prefixes[d], limits[d]
  if 16 ^ w * 2 <= n then
    -- few hashes for the batch (a first bucket's 256): one HMGET per hash, not an HGET per key
    local groups = {}
    for i = 1, n do
      if out[i] == '0' then
        local h = i * 26 - 25
        local shard = sub(hex, h, h + w - 1)
        local g = groups[shard]
        if g then g[#g + 1] = i else groups[shard] = {i} end
      end
    end
    for shard, g in pairs(groups) do
      for from = 1, #g, 500 do  -- bounded: unpack puts every argument on Lua's C stack
        local to = math.min(from + 499, #g)
        local fields = {}
        for k = from, to do fields[k - from + 1] = sub(blob, g[k] * 13 - 9, g[k] * 13) end
        local hours = call('HMGET', name .. shard, unpack(fields))
        for k = from, to do
          local hour = hours[k - from + 1]
          if hour and (tonumber(hour) + 1) * 3600 > limit then out[g[k]] = '1' end
        end
      end
    end
  else
    for i = 1, n do
      if out[i] == '0' then
        local h = i * 26 - 25
        local hour = call('HGET', name .. sub(hex, h, h + w - 1), sub(blob, i * 13 - 9, i * 13))
        if hour and (tonumber(hour) + 1) * 3600 > limit then out[i] = '1' end
      end
    end
  end
end
return table.concat(out)  -- one bulk string of '0'/'1': one reply to parse, not one per key
"""
)

_CLAIM_LUA = (
    _TIME_LUA
    + """
local now, ttl, base = clock(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local days, most = tonumber(ARGV[4]), tonumber(ARGV[5])  -- most: the widest shards allowed
local first, grow_keys = tonumber(ARGV[6]), tonumber(ARGV[7])
local hex, blob = ARGV[8], ARGV[9]  -- the keys' 13-byte prefixes: hex (shard), raw (field)
local call, match, sub = redis.call, string.match, string.sub
local span = days * 86400
local start = floor(now / span) * span
local hour, expire_at = floor((now - start) / 3600), start + 2 * span  -- any TTL of D days
local registry, prefix = base .. ':buckets', bucket(base, start, days)
local prev = bucket(base, start - span, days)
local function opening(name)  -- (widths, opened at or '') of a bucket: registry, else `<name>w`
  local meta = call('HGET', registry, name)
  if meta then return match(meta, '^%d+ %d+ (%d+) ?(%d*)$') end  -- (1fa79dc: no opened at)
  local saved = call('GET', name .. 'w')
  if saved then return match(saved, '^(%d+) ?(%d*)$') end
end
local function fewest(rate, w)  -- the fewest hex digits (>= w) giving ~32 keys a hash at `rate`
  while w < most and rate * span > 32 * 16 ^ w do w = w + 1 end
  return w
end
local meta = call('HGET', registry, prefix)
local known, widths, opened = nil, nil, ''
if meta then
  local e, w, o = match(meta, '^%d+ (%d+) (%d+) ?(%d*)$')
  known, widths, opened = tonumber(e), w, o  -- the parts the bucket has
else
  widths, opened = opening(prefix)  -- the registry lost it: `<prefix>w` keeps its widths
  if not widths then
    -- opening the bucket: size the shards by the bucket before: ~32 keys a hash at its rate,
    -- so a hash stays in the listpack encoding (<= 128 fields) up to 4x that rate
    opened = floor(now)
    local _, po = opening(prev)
    local covered = 0
    if po and po ~= '' then covered = start - tonumber(po) end  -- seconds it was open
    if covered >= span / 8 then
      widths = tostring(fewest(tonumber(call('GET', prev .. 'n') or '0') / covered, 1))
    else
      -- nothing to size by: a few hashes, made in the hashtable encoding now (a marker value
      -- longer than hash-max-listpack-value), so that no claim creates a key or an EXPIREAT
      -- and no lookup scans a listpack; a wider part opens if they fill (below)
      local w = math.min(first, most)
      widths = tostring(w)
      local fmt, long = '%0' .. w .. 'x', string.rep('-', 65)
      for shard = 0, 16 ^ w - 1 do
        local key = prefix .. string.format(fmt, shard)
        call('HSET', key, '', long)
        call('EXPIREAT', key, expire_at)
      end
    end
  end
end
local width = tonumber(sub(widths, -1))  -- claims go into the newest part
local function save()
  return widths .. (opened ~= '' and ' ' .. opened or '')
end
if not known or known < expire_at then
  -- opening a bucket, re-listing a lost one, a longer TTL: drop expired entries, keep the
  -- registry to the last
  local top = expire_at
  local entries = call('HGETALL', registry)
  for i = 1, #entries, 2 do
    local e = tonumber(match(entries[i + 1], '^%d+ (%d+)'))
    if e <= now then call('HDEL', registry, entries[i]) elseif e > top then top = e end
  end
  call('HSET', registry, prefix, start .. ' ' .. expire_at .. ' ' .. save())
  call('EXPIREAT', registry, top)
  call('SET', prefix .. 'w', save(), 'EXAT', expire_at)
else
  call('SET', prefix .. 'w', save(), 'NX', 'EXAT', expire_at)  -- a bucket opened before it
end
-- as strings once: redis.call formats a number argument with snprintf on every call
local hour_s, expire_s = tostring(hour), tostring(expire_at)
local added, count = 0, #blob / 13
if 16 ^ width * 2 <= count then
  -- few hashes for the batch (a first bucket's 256): one HSET per hash with its distinct
  -- fields; the marker is new only if the hash is, then HSET answers one more than the fields
  local groups = {}
  for i = 1, count do
    local h = i * 26 - 25
    local shard = sub(hex, h, h + width - 1)
    local g = groups[shard]
    if not g then g = {}; groups[shard] = g end
    g[sub(blob, i * 13 - 9, i * 13)] = true
  end
  for shard, g in pairs(groups) do
    local key, args, m = prefix .. shard, {'', ''}, 0
    local function flush()  -- bounded: unpack puts every argument on Lua's C stack
      local new = call('HSET', key, unpack(args))
      if args[1] == '' and new > m then
        call('EXPIREAT', key, expire_s)
        new = new - 1
      end
      added, args, m = added + new, {}, 0
    end
    for field in pairs(g) do
      args[#args + 1] = field
      args[#args + 1] = hour_s
      m = m + 1
      if m == 500 then flush() end
    end
    if m > 0 then flush() end
  end
else
  for i = 1, count do
    local h = i * 26 - 25
    local key = prefix .. sub(hex, h, h + width - 1)
    -- the empty marker field is new only in a hash this call created: only those need their
    -- EXPIREAT, every other hash has it already
    local n = call('HSET', key, '', '', sub(blob, i * 13 - 9, i * 13), hour_s)
    if n == 2 then call('EXPIREAT', key, expire_s) end
    if n > 0 then added = added + 1 end
  end
end
local counter = prefix .. 'n'
local total = call('INCRBY', counter, added)
call('EXPIREAT', counter, expire_at)
if width < most and total > math.max(64 * 16 ^ width, grow_keys) then
  -- the newest part is full (64 keys a hash, half the listpack limit; the first part of an
  -- unmeasured bucket: `grow_keys`): later claims go into a wider part, sized by this bucket's
  -- rate so far; its keys stay where they are and lookups probe every part
  local since = opened ~= '' and tonumber(opened) or start
  widths = widths .. fewest(total / math.max(now - since, 1), width + 1)
  call('HSET', registry, prefix, start .. ' ' .. expire_at .. ' ' .. save())
  call('SET', prefix .. 'w', save(), 'EXAT', expire_at)
end
return added
"""
)


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
    """IdempotencyStore on TTL-wide, sharded hashes (layout in the module docstring).

    Every decision (what has expired, the bucket and the hour of a claim) is made by Redis's
    `TIME` inside the scripts, so workers whose clocks disagree still agree on every key.
    `clock` is the worker's own clock: only `health()` reads it, to report its skew against
    Redis. `server_clock` stands in for Redis's clock (tests and benches that move days);
    leave it None in production."""

    def __init__(
        self,
        client: aioredis.Redis,
        ttl_seconds: int = 7 * DAY,
        prefix: str = "ingest_idempotency",
        clock: Callable[[], float] = time.time,
        shard_bits: int | None = None,
        old_shard_bits: int = 20,
        *,
        server_clock: Callable[[], float] | None = None,
        first_shard_bits: int = FIRST_SHARD_BITS,
        grow_keys: int = GROW_KEYS,
    ) -> None:
        self.bucket_days = max(1, -(-ttl_seconds // DAY))
        bits = (20 if self.bucket_days == 1 else 24) if shard_bits is None else shard_bits
        for b in (bits, old_shard_bits, first_shard_bits):
            if b not in range(4, 25, 4):
                raise ValueError("shard_bits must be one of 4, 8, ..., 24 (whole hex digits)")
        self._r = client
        self._ttl = ttl_seconds
        self._prefix = prefix
        self._clock = clock
        self._server_clock = server_clock
        self._width = bits // 4
        self._old_width = old_shard_bits // 4
        self._first_width = first_shard_bits // 4
        self._grow_keys = grow_keys
        self.registry = f"{prefix}:buckets"
        self._seen = client.register_script(_SEEN_LUA)
        self._claim = client.register_script(_CLAIM_LUA)

    def bucket_start(self, now: float) -> int:
        """Start (epoch seconds, UTC midnight) of the bucket a claim at `now` goes into."""
        width = self.bucket_days * DAY
        return int(now // width) * width

    def bucket(self, now: float) -> tuple[int, int, int]:
        """(start, hour in the bucket, EXPIREAT) of a claim at `now`: the hash outlives the
        claim's hour + any TTL of the same bucket width (so a TTL raised within it holds for
        every key already claimed), and only this bucket and the one before can hold a live
        claim (the claim script computes the same from Redis's clock)."""
        start = self.bucket_start(now)
        return start, int(now - start) // 3600, start + 2 * self.bucket_days * DAY

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

    def _time_arg(self) -> str:
        """The scripts' first argument: empty = Redis's own TIME."""
        return "" if self._server_clock is None else repr(self._server_clock())

    async def server_time(self) -> float:
        """Redis's clock (or the test's stand-in): what the scripts decide by."""
        if self._server_clock is not None:
            return self._server_clock()
        async with _guard(self._r):
            sec, usec = await self._r.time()
        return sec + usec / 1e6

    async def seen(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        args: list[Any] = [self._time_arg(), self._ttl, self._prefix, self.bucket_days]
        args += [self._old_width, *_prefixes(keys)]
        async with _guard(self._r):
            hits = await self._seen(args=args)
        return [h == 49 for h in hits]  # b"1"

    async def claim(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        args: list[Any] = [self._time_arg(), self._ttl, self._prefix, self.bucket_days]
        args += [self._width, self._first_width, self._grow_keys, *_prefixes(keys)]
        async with _guard(self._r):
            await self._claim(args=args)

    async def _live_buckets(self, now: float) -> list[tuple[str, int]]:
        """(prefix, start) of every live bucket: the registry's, the current bucket and the one
        before (should the registry have lost them) and the old layout's days."""
        async with _guard(self._r):
            entries = await self._r.hgetall(self.registry)
        live = []
        for name, meta in entries.items():
            began, expire_at = meta.split()[:2]
            if int(expire_at) > now:
                live.append((name.decode() if isinstance(name, bytes) else name, int(began)))
        current = self.bucket_start(now)
        for start in (current, current - self.bucket_days * DAY):
            if self.bucket_prefix(start) not in {p for p, _ in live}:
                live.append((self.bucket_prefix(start), start))
        live += [(self.day_prefix(d), d * DAY) for d in self.live_days(now)]
        return live

    async def stats(self) -> dict[str, Any]:
        """Totals from the per-bucket counters (INFO keyspace cannot show fields in hashes)."""
        now = await self.server_time()
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
        """Connected, ping and `clock_skew_s`: this worker's clock minus Redis's (decisions
        use Redis's, so a skew is harmless to the keys; it is shown for the operator)."""
        try:
            async with _guard(self._r):
                t0 = time.perf_counter()
                await self._r.ping()
                ms = (time.perf_counter() - t0) * 1000
                sec, usec = await self._r.time()
                skew = self._clock() - (sec + usec / 1e6)
        except StoreUnavailable as exc:
            return {"connected": False, "target": _where(self._r), "error": exc.cause}
        return {
            "connected": True,
            "target": _where(self._r),
            "ping_ms": round(ms, 2),
            "clock_skew_s": round(skew, 3),
        }
