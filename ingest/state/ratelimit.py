"""Fleet-wide per-tenant rate limits: GCRA in Redis, one script call per batch.

A token bucket per process lets N pods admit N times a tenant's limit. GCRA (the generic cell
rate algorithm) keeps the same limit in one number per tenant, the *theoretical arrival time*
(TAT): the instant at which the tenant's bucket would be full again. Taking n records at
`now` moves it to `max(TAT, now) + n/rate`; the take is allowed when that lies no more than
`burst/rate` ahead of `now`, else it is refused whole and the caller learns how long to wait.
That is exactly a token bucket with `tokens = burst - (TAT - now) * rate`, but its state is
one float a Lua script can read and write atomically, so every pod shares one bucket.

    key    ingest_ratelimit:<tenant>   TAT in seconds (Redis server time), "%.17g"
    expiry when the bucket would be full again (then the key means nothing)

The clock is Redis's own (`TIME`), so pods with skewed clocks share one timeline. Tests pass
`now` explicitly to compare the script with `gcra()` below, the model the property tests check.

A Redis outage must neither stop intake nor crash it: the limiter falls back to a local
token bucket (the tenant's full limit per pod, so up to N x the limit fleet-wide while Redis
is down), says so in `status()`, and tries Redis again after `retry_seconds`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ingest.config import TenantLimits
from ingest.pipeline.admission import LocalRateLimiter

log = logging.getLogger(__name__)
PREFIX = "ingest_ratelimit:"
EPS = 1e-9  # token slack, the same as the local bucket's: n tokens refilled exactly are there

_GCRA_LUA = """
local n, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local base = math.max(tat, now)
if n > burst + 1e-9 then
  return {'inf', string.format('%.17g', burst - (base - now) * rate)}
end
local new = base + n / rate
if (new - now) * rate <= burst + 1e-9 then
  local ms = math.ceil((new - now) * 1000) + 1000
  redis.call('SET', KEYS[1], string.format('%.17g', new), 'PX', ms)
  return {'0', string.format('%.17g', burst - (new - now) * rate)}
end
local wait = new - burst / rate - now
return {string.format('%.17g', wait), string.format('%.17g', burst - (base - now) * rate)}
"""


def gcra(tat: float, now: float, n: float, rate: float, burst: float) -> tuple[float, float]:
    """One take of n at `now` against TAT `tat`: (wait, new TAT).

    wait == 0: taken, the TAT moves; wait > 0: refused whole, the TAT stays, and the same take
    succeeds `wait` seconds later; wait == inf: n exceeds the burst and never fits.
    The Lua script above does exactly this arithmetic (same operations, same order).
    """
    base = max(tat, now)
    if n > burst + EPS:
        return math.inf, tat
    new = base + n / rate
    if (new - now) * rate <= burst + EPS:
        return 0.0, new
    return new - burst / rate - now, tat


def gcra_tokens(tat: float, now: float, rate: float, burst: float) -> float:
    """Tokens a TAT leaves at `now` (the token-bucket view, for health)."""
    return burst - (max(tat, now) - now) * rate


class RedisRateLimiter:
    """`RateLimiter` shared by every pod through Redis; falls back to local buckets."""

    def __init__(
        self,
        client: aioredis.Redis,
        limits_for: Callable[[str], TenantLimits],
        *,
        retry_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._r = client
        self._limits_for = limits_for
        self._script = client.register_script(_GCRA_LUA)
        self._local = LocalRateLimiter(limits_for, clock)
        self._clock = clock
        self._retry_seconds = retry_seconds
        self._down_until = -math.inf
        self._error: str | None = None
        self._since: float | None = None  # wall time the fallback began
        self._tokens: dict[str, float] = {}
        self.calls = 0  # script calls made (one per batch): tests and health read it
        self.fallbacks = 0  # times Redis failed and local buckets took over

    async def take(self, tenant: str, n: float, now: float | None = None) -> float:
        lim = self._limits_for(tenant)
        if self._clock() < self._down_until:
            return await self._local.take(tenant, n)
        args: list[Any] = [
            repr(float(n)),
            repr(lim.rate),
            repr(lim.burst),
            "" if now is None else repr(now),
        ]
        try:
            self.calls += 1
            wait_s, tokens_s = await self._script(keys=[PREFIX + tenant], args=args)
        except (RedisError, OSError) as exc:
            self._fall_back(exc)
            return await self._local.take(tenant, n)
        if self._error is not None:
            log.warning("rate limits: Redis answers again; fleet-wide limits are back")
            self._error, self._since = None, None
        self._tokens[tenant] = float(tokens_s)
        return math.inf if wait_s == b"inf" else float(wait_s)

    def _fall_back(self, exc: BaseException) -> None:
        if self._error is None:
            log.warning(
                "rate limits: Redis unreachable (%s); limiting per pod until it answers", exc
            )
            self._since = time.time()
            self.fallbacks += 1
        self._error = f"{type(exc).__name__}: {exc}"
        self._down_until = self._clock() + self._retry_seconds

    def tokens(self) -> dict[str, float]:
        if self._error is not None:
            return self._local.tokens()
        return dict(self._tokens)

    def status(self) -> dict[str, Any]:
        """For /health/detailed: fleet-wide or, while Redis is down, per pod (and why)."""
        return {
            "backend": "redis-gcra",
            "fleet_wide": self._error is None,
            "error": self._error,
            "fallback_since": self._since,
            "fallbacks": self.fallbacks,
        }
