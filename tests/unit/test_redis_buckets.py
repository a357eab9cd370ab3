"""The bucket arithmetic of the Redis idempotency store, without a server: a lookup probes the
registry's live buckets, so what must hold is that a claim still within its TTL lies in the
current bucket or the one before (two probes), and that its hash outlives it."""

from __future__ import annotations

import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from ingest.state.redis import DAY, RedisIdempotencyStore

NOW = 1_764_547_200.0  # 2025-12-01T00:00:00Z


@given(
    ttl=st.integers(1, 30 * DAY),
    claim=st.floats(NOW, NOW + 400 * DAY),
    later=st.floats(0, 60 * DAY),
)
def test_a_live_claim_is_in_the_current_bucket_or_the_one_before(
    ttl: int, claim: float, later: float
) -> None:
    store = RedisIdempotencyStore(aioredis.Redis(), ttl)
    width = store.bucket_days * DAY
    assert width >= ttl and width % DAY == 0  # whole days, at least the TTL
    start, hour, expire_at = store.bucket(claim)
    assert start % width == 0 and start <= claim < start + width
    assert 0 <= hour < store.bucket_days * 24
    hour_end = start + (hour + 1) * 3600
    assert hour_end == claim // 3600 * 3600 + 3600  # the same hour as the day buckets kept
    assert expire_at >= hour_end + ttl  # the hash holds the key as long as it may be seen
    now = claim + later
    if hour_end + ttl > now:  # seen at `now`
        assert start in (store.bucket_start(now), store.bucket_start(now) - width)
        assert expire_at > now  # the registry lists its bucket as live


@given(ttl=st.integers(1, 30 * DAY), day=st.integers(0, 40_000))
def test_bucket_names_are_their_start_day_and_width(ttl: int, day: int) -> None:
    store = RedisIdempotencyStore(aioredis.Redis(), ttl, "p")
    start = store.bucket_start(day * DAY)
    name = store.bucket_prefix(start)
    assert name.startswith("p:") and name.endswith(f"+{store.bucket_days}d:")
    assert name != store.day_prefix(start // DAY)  # never a name of the day layout
