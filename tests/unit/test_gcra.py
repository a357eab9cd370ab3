"""GCRA, the fleet-wide rate limit's arithmetic (ingest.state.ratelimit.gcra), on a fake clock.

The Lua script in Redis does the same arithmetic; tests/integration/test_redis_ratelimit.py
checks it against this model.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pipeline.admission import TokenBucket
from ingest.state.ratelimit import gcra, gcra_tokens

rates = st.floats(0.5, 5000)
bursts = st.floats(1, 5000)
# (seconds since the previous take, share of the burst asked for)
steps = st.lists(st.tuples(st.floats(0, 3), st.floats(0, 1.2)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts, ops=steps)
def test_never_more_than_burst_plus_rate_over_any_window(
    rate: float, burst: float, ops: list[tuple[float, float]]
) -> None:
    now, tat = 1_000.0, 0.0
    taken: list[tuple[float, float]] = []
    for dt, share in ops:
        now += dt
        n = share * burst
        wait, tat = gcra(tat, now, n, rate, burst)
        if wait == 0:
            taken.append((now, n))
        tokens = gcra_tokens(tat, now, rate, burst)
        assert -1e-6 * burst <= tokens <= burst
    for i, (t0, _) in enumerate(taken):
        total = 0.0
        for t1, n in taken[i:]:
            total += n
            assert total <= burst + rate * (t1 - t0) + 1e-6 * burst


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts, ops=steps, last=st.floats(0.01, 1))
def test_refusal_is_whole_and_its_wait_is_exactly_enough(
    rate: float, burst: float, ops: list[tuple[float, float]], last: float
) -> None:
    now, tat = 50.0, 0.0
    for dt, share in ops:
        now += dt
        _, tat = gcra(tat, now, share * burst, rate, burst)
    n = last * burst
    wait, new_tat = gcra(tat, now, n, rate, burst)
    if wait == 0:
        assert new_tat > tat or n == 0 or tat < now
        return
    assert math.isfinite(wait) and wait > 0
    assert new_tat == tat  # refused whole: nothing taken
    if wait > 1e-6:
        early, _ = gcra(tat, now + wait * 0.99, n, rate, burst)
        assert early > 0
    again, _ = gcra(tat, now + wait, n, rate, burst)
    assert again == 0


@settings(max_examples=100, deadline=None)
@given(rate=rates, burst=bursts, over=st.floats(1.0001, 10), now=st.floats(0, 1e9))
def test_more_than_the_burst_never_fits(rate: float, burst: float, over: float, now: float) -> None:
    wait, tat = gcra(0.0, now, burst * over, rate, burst)
    assert wait == math.inf and tat == 0.0


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts, ops=steps)
def test_same_decisions_as_a_token_bucket(
    rate: float, burst: float, ops: list[tuple[float, float]]
) -> None:
    """GCRA is a token bucket kept as one number: decide the same, away from float ties."""
    clock = [0.0]
    bucket = TokenBucket(rate, burst, clock=lambda: clock[0])
    tat = 0.0
    for dt, share in ops:
        clock[0] += dt
        n = share * burst
        before = bucket.tokens
        assert math.isclose(gcra_tokens(tat, clock[0], rate, burst), before, abs_tol=1e-6 * burst)
        wait, tat = gcra(tat, clock[0], n, rate, burst)
        took = bucket.try_take(n)
        if abs(before - n) > 1e-6 * burst:  # not a tie within float noise
            assert (wait == 0) is took


@settings(max_examples=100, deadline=None)
@given(
    rate=st.floats(1, 1000),
    burst=st.floats(1, 1000),
    share=st.floats(0.01, 1),
    seconds=st.floats(1, 100),
)
def test_saturated_tenant_gets_its_whole_rate(
    rate: float, burst: float, share: float, seconds: float
) -> None:
    """Asking all the time, a tenant gets rate x time + burst, less at most one request."""
    n = share * burst
    now, tat, got = 0.0, 0.0, 0.0
    while now <= seconds:
        wait, tat = gcra(tat, now, n, rate, burst)
        if wait == 0:
            got += n
        else:
            now += wait
    assert got <= burst + rate * seconds + 1e-6 * burst + n
    assert got >= burst + rate * seconds - n - 1e-6 * burst
