"""The fleet-wide GCRA limiter against a real redis-server: the Lua script equals the model,
one script call per batch, pods share one limit, and a Redis outage falls back per pod."""

from __future__ import annotations

import asyncio
import math

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.config import AdmissionConfig, TenantLimits
from ingest.pipeline.admission import Admission, Rejected
from ingest.state.ratelimit import PREFIX, RedisRateLimiter, gcra, gcra_tokens
from ingest.state.redis import redis_client
from tests.integration.conftest import PrivateServer

pytestmark = pytest.mark.integration


def limiter(client: aioredis.Redis, rate: float, burst: float) -> RedisRateLimiter:
    return RedisRateLimiter(client, lambda t: TenantLimits(rate=rate, burst=burst))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rate=st.floats(0.5, 5000),
    burst=st.floats(1, 5000),
    ops=st.lists(st.tuples(st.floats(0, 3), st.floats(0, 1.2)), min_size=1, max_size=25),
)
def test_script_decides_exactly_like_the_model(
    redis_url: str, uid: str, rate: float, burst: float, ops: list[tuple[float, float]]
) -> None:
    async def go() -> None:
        client = redis_client(redis_url)
        lim = limiter(client, rate, burst)
        tenant = f"model-{uid}"
        await client.delete(PREFIX + tenant)
        now, tat = 1_700_000_000.0, 0.0
        try:
            for dt, share in ops:
                now += dt
                n = share * burst
                want, tat = gcra(tat, now, n, rate, burst)
                got = await lim.take(tenant, n, now=now)
                assert got == want or math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-12)
                assert math.isclose(
                    lim.tokens()[tenant], gcra_tokens(tat, now, rate, burst), abs_tol=1e-9 * burst
                )
        finally:
            await client.delete(PREFIX + tenant)
            await client.aclose()

    asyncio.run(go())


async def _evalsha_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_one_script_call_per_batch_not_per_record(rclient: aioredis.Redis, uid: str) -> None:
    lim = limiter(rclient, 1000, 2000)
    adm = Admission(AdmissionConfig(), lambda t: TenantLimits(rate=1000, burst=2000), limiter=lim)
    before = await _evalsha_calls(rclient)
    await adm.try_admit(f"batch-{uid}", 500)
    await adm.try_admit(f"batch-{uid}", 500)
    await adm.admit(f"batch-{uid}", 900)
    assert await _evalsha_calls(rclient) - before == 3  # 1,900 records, three round trips
    assert lim.status()["fleet_wide"] is True


async def test_two_pods_share_one_limit(redis_url: str, uid: str) -> None:
    """Two clients (two pods) on one tenant: together they get one burst, not two."""
    a, b = redis_client(redis_url), redis_client(redis_url)
    try:
        pods = [
            Admission(AdmissionConfig(), lambda t: TenantLimits(rate=1, burst=100), limiter=lim)
            for lim in (limiter(a, 1, 100), limiter(b, 1, 100))
        ]
        tenant = f"shared-{uid}"
        await pods[0].try_admit(tenant, 60)
        with pytest.raises(Rejected) as ei:
            await pods[1].try_admit(tenant, 60)  # a local bucket would have allowed this
        assert ei.value.retry_after == pytest.approx(20, abs=0.5)
        await pods[1].try_admit(tenant, 40)
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_outage_falls_back_per_pod_and_comes_back(
    private_redis: PrivateServer, uid: str
) -> None:
    client = redis_client(private_redis.url)
    lim = RedisRateLimiter(client, lambda t: TenantLimits(rate=10, burst=20), retry_seconds=0.2)
    tenant = f"outage-{uid}"
    try:
        assert await lim.take(tenant, 15) == 0
        private_redis.run("stop")
        assert await lim.take(tenant, 15) == 0  # the local bucket starts full
        status = lim.status()
        assert status["fleet_wide"] is False and status["error"]
        assert await lim.take(tenant, 15) > 0  # ...and limits per pod meanwhile
        private_redis.run("start")
        await asyncio.sleep(0.3)
        for _ in range(50):
            await lim.take(tenant, 1)
            if lim.status()["fleet_wide"]:
                break
            await asyncio.sleep(0.1)
        assert lim.status() == {
            "backend": "redis-gcra",
            "fleet_wide": True,
            "error": None,
            "fallback_since": None,
            "fallbacks": 1,
        }
    finally:
        await client.aclose()
