"""Admission: token buckets, the backpressure state machine, brownout sampling, drain/pause."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
from collections.abc import Coroutine
from datetime import datetime
from typing import Any, TypeVar, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import AdmissionConfig, TenantLimits
from ingest.pipeline.admission import (
    STATE_VALUES,
    THROTTLE_WINDOW,
    Admission,
    BackpressureState,
    Rejected,
    TokenBucket,
)

S = BackpressureState
T = TypeVar("T")
WALL0 = 1_700_000_000.0


class FakeTime:
    """Monotonic clock, wall clock and sleep that move together, only when told to."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL0 + self.now

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)
        self.now += delay
        await asyncio.sleep(0)


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (the local limiter) from a sync hypothesis test."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return cast(T, stop.value)
    coro.close()
    raise AssertionError("the coroutine suspended")


def state_of(adm: Admission) -> BackpressureState:
    """Read the property through a call, so mypy does not narrow it between reads."""
    return adm.state


def make(
    ft: FakeTime,
    rate: float = 10.0,
    burst: float = 5.0,
    **cfg: float,
) -> tuple[Admission, list[BackpressureState]]:
    config = AdmissionConfig(
        max_in_flight=int(cfg.pop("max_in_flight", 2)),
        queue_high_watermark=int(cfg.pop("high", 100)),
        queue_low_watermark=int(cfg.pop("low", 20)),
        brownout_after_seconds=cfg.pop("after", 5.0),
        brownout_rate=cfg.pop("brownout_rate", 0.5),
    )
    adm = Admission(
        config,
        lambda tenant: TenantLimits(rate=rate, burst=burst),
        clock=ft,
        wall_clock=ft.wall,
        sleep=ft.sleep,
    )
    changes: list[BackpressureState] = []
    adm.on_change = changes.append
    return adm, changes


# -- token bucket --------------------------------------------------------------------------


def test_state_values_match_runbook_order() -> None:
    assert [STATE_VALUES[s] for s in S] == [0, 1, 2, 3, 4]
    assert [s.value for s in S] == ["normal", "throttled", "brownout", "drain", "paused"]


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.5, 1000),
    burst=st.floats(1, 500),
    ops=st.lists(st.tuples(st.floats(0, 2), st.floats(0.01, 600)), max_size=40),
)
def test_bucket_never_exceeds_burst_plus_rate_over_any_window(
    rate: float, burst: float, ops: list[tuple[float, float]]
) -> None:
    ft = FakeTime()
    b = TokenBucket(rate, burst, clock=ft)
    taken: list[tuple[float, float]] = []  # (time, amount)
    for dt, n in ops:
        ft.now += dt
        if b.try_take(n):
            taken.append((ft.now, n))
        assert -1e-6 <= b.tokens <= burst
    for i, (t0, _) in enumerate(taken):
        total = 0.0
        for t1, n in taken[i:]:
            total += n
            assert total <= burst + rate * (t1 - t0) + 1e-6


@settings(max_examples=100, deadline=None)
@given(rate=st.floats(0.5, 1000), burst=st.floats(1, 500), first=st.floats(0, 1), n=st.floats(0, 1))
def test_wait_time_is_exactly_enough(rate: float, burst: float, first: float, n: float) -> None:
    ft = FakeTime()
    b = TokenBucket(rate, burst, clock=ft)
    assert b.try_take(first * burst)
    need = n * burst
    w = b.wait_time(need)
    assert w >= 0
    if w > 1e-6:
        ft.now += w * 0.99
        assert not b.try_take(need)
    ft.now += w
    assert b.try_take(need)
    assert b.wait_time(burst * 1.01) == math.inf


# -- push path -----------------------------------------------------------------------------


async def test_try_admit_throttles_with_retry_after_and_expires_lazily() -> None:
    ft = FakeTime()
    adm, changes = make(ft, rate=10, burst=5)
    await adm.try_admit("acme", 5)
    with pytest.raises(Rejected) as ei:
        await adm.try_admit("acme", 3)
    assert ei.value.state is S.THROTTLED
    assert ei.value.retry_after == pytest.approx(0.3)
    assert "acme" in ei.value.reason
    assert state_of(adm) is S.THROTTLED
    await adm.try_admit("other", 5)  # buckets are per tenant
    ft.now += THROTTLE_WINDOW - 0.01
    assert state_of(adm) is S.THROTTLED
    ft.now += 0.02
    assert state_of(adm) is S.NORMAL  # noticed lazily, still reported
    assert changes == [S.THROTTLED, S.NORMAL]
    assert datetime.fromisoformat(adm.snapshot()["since"]).timestamp() == pytest.approx(
        WALL0 + THROTTLE_WINDOW + 0.01
    )


async def test_try_admit_larger_than_burst_is_refused_without_retry_after() -> None:
    ft = FakeTime()
    adm, _ = make(ft, burst=5)
    with pytest.raises(Rejected) as ei:
        await adm.try_admit("acme", 6)
    assert ei.value.state is S.THROTTLED and ei.value.retry_after is None
    assert ei.value.too_large and "split it into requests of at most 5 records" in ei.value.reason
    assert state_of(adm) is S.NORMAL  # the request is refused, nobody is throttled
    assert adm.limiter.tokens() == {}  # the limiter was never asked


async def test_drain_and_pause_refuse_push_and_say_which() -> None:
    ft = FakeTime()
    adm, changes = make(ft)
    adm.drain()
    with pytest.raises(Rejected) as ei:
        await adm.try_admit("acme", 1)
    assert ei.value.state is S.DRAIN and "drain" in ei.value.reason
    adm.pause()
    with pytest.raises(Rejected) as ei:
        await adm.try_admit("acme", 1)
    assert ei.value.state is S.PAUSED and "pause" in ei.value.reason
    adm.resume()
    await adm.try_admit("acme", 1)
    assert changes == [S.DRAIN, S.PAUSED, S.NORMAL]


# -- pull path -----------------------------------------------------------------------------


async def test_admit_waits_for_tokens_in_burst_sized_parts() -> None:
    ft = FakeTime()
    adm, changes = make(ft, rate=10, burst=5)
    await adm.admit("acme", 23)  # 5 at once, 18 more at 10/s
    assert ft.now == pytest.approx(1.8)
    assert all(d <= 0.5 + 1e-9 for d in ft.slept)  # never waits for more than a burst
    assert S.THROTTLED in changes
    await adm.admit("acme", 0)


async def test_admit_rejects_in_drain() -> None:
    ft = FakeTime()
    adm, _ = make(ft)
    adm.drain()
    with pytest.raises(Rejected) as ei:
        await adm.admit("acme", 1)
    assert ei.value.state is S.DRAIN


async def test_paused_blocks_admit_until_resume() -> None:
    ft = FakeTime()
    adm, _ = make(ft)
    adm.pause()
    task = asyncio.create_task(adm.admit("acme", 1))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()
    assert adm.limiter.tokens().get("acme", 5) == 5  # nothing taken while paused
    adm.resume()
    await asyncio.wait_for(task, 1.0)
    assert adm.limiter.tokens()["acme"] == 4


async def test_drain_releases_paused_waiters_with_rejection() -> None:
    ft = FakeTime()
    adm, _ = make(ft)
    adm.pause()
    waiter = asyncio.create_task(adm.wait_while_paused())
    admit = asyncio.create_task(adm.admit("acme", 1))
    await asyncio.sleep(0)
    assert not waiter.done()
    adm.drain()
    await asyncio.wait_for(waiter, 1.0)
    with pytest.raises(Rejected):  # paused and draining: paused shows, drain still refuses
        await asyncio.wait_for(admit, 1.0)


async def test_wait_while_paused_returns_at_once_when_not_paused() -> None:
    adm, _ = make(FakeTime())
    await asyncio.wait_for(adm.wait_while_paused(), 0.1)


async def test_in_flight_semaphore_caps_concurrency() -> None:
    adm, _ = make(FakeTime(), max_in_flight=2)
    peak = 0

    async def batch() -> None:
        nonlocal peak
        async with adm.in_flight():
            peak = max(peak, adm.in_flight_count)
            await asyncio.sleep(0.001)

    await asyncio.gather(*(batch() for _ in range(6)))
    assert peak == 2
    assert adm.in_flight_count == 0


# -- state precedence ----------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.sampled_from(["pause", "drain", "brownout", "throttle", "deep", "resume", "wait"]),
        max_size=15,
    )
)
def test_state_precedence(ops: list[str]) -> None:
    ft = FakeTime()
    adm, changes = make(ft, rate=1, burst=1, after=0.0)
    paused = drain = manual = auto = False
    throttled_until = -1.0
    depth = 0
    for op in ops:
        if op == "pause":
            adm.pause()
            paused = True
        elif op == "drain":
            adm.drain()
            drain = True
        elif op == "brownout":
            adm.brownout(0.2)
            manual = True
        elif op == "throttle":
            try:
                run_now(adm.try_admit("t", 1))
                run_now(adm.try_admit("t", 1))
            except Rejected:
                pass
            if not (paused or drain):
                throttled_until = ft.now + THROTTLE_WINDOW
        elif op == "deep":
            depth = 1000
            adm.set_queue_depth(depth)
            auto = True  # after=0: immediately
        elif op == "resume":
            adm.resume()
            paused = drain = manual = False
            auto = depth > 100  # after=0: the rule re-enters at once
        else:
            ft.now += 0.6
        if paused:
            want = S.PAUSED
        elif drain:
            want = S.DRAIN
        elif manual or auto:
            want = S.BROWNOUT
        elif ft.now < throttled_until:
            want = S.THROTTLED
        else:
            want = S.NORMAL
        assert state_of(adm) is want
        assert adm.brownout_mode == ("manual" if manual else "automatic" if auto else None)
    # on_change saw exactly the transitions, none repeated
    assert all(a is not b for a, b in itertools.pairwise(changes))
    assert (changes[-1] if changes else S.NORMAL) is adm.state


# -- automatic brownout ------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.tuples(st.floats(0, 4), st.integers(0, 200)), max_size=40))
def test_auto_brownout_hysteresis(steps: list[tuple[float, int]]) -> None:
    high, low, after = 100, 20, 5.0
    ft = FakeTime()
    adm, _ = make(ft, high=high, low=low, after=after)
    on = False
    above_since: float | None = None
    for dt, depth in steps:
        ft.now += dt
        if above_since is not None and ft.now - above_since >= after:
            on = True  # depth was still above high until this very report
        before = adm.state is S.BROWNOUT
        assert before is on
        adm.set_queue_depth(depth)
        if depth > high:
            above_since = ft.now if above_since is None else above_since
            on = on or ft.now - above_since >= after
        else:
            above_since = None
            if depth < low:
                on = False
        now_on = adm.state is S.BROWNOUT
        assert now_on is on
        if low <= depth <= high:
            assert now_on is before  # no flapping between the watermarks
        assert adm.queue_depth == depth
        assert adm.brownout_rate == (0.5 if on else None)


def test_auto_brownout_enters_lazily_and_resume_restarts_timer() -> None:
    ft = FakeTime()
    adm, changes = make(ft, high=100, low=20, after=5.0)
    adm.set_queue_depth(150)
    ft.now = 4.9
    assert state_of(adm) is S.NORMAL
    ft.now = 5.0
    assert state_of(adm) is S.BROWNOUT  # no new depth report needed
    assert adm.snapshot()["brownout_mode"] == "automatic"
    adm.resume()
    assert state_of(adm) is S.NORMAL
    ft.now = 9.9
    assert state_of(adm) is S.NORMAL
    ft.now = 10.0
    assert state_of(adm) is S.BROWNOUT
    assert changes == [S.BROWNOUT, S.NORMAL, S.BROWNOUT]


def test_manual_brownout_rate_validation_and_default() -> None:
    adm, _ = make(FakeTime(), brownout_rate=0.3)
    for bad in (0.0, -0.1, 1.01, math.nan):
        with pytest.raises(ValueError):
            adm.brownout(bad)
    assert state_of(adm) is S.NORMAL
    adm.brownout()
    assert adm.brownout_rate == 0.3
    adm.brownout(1.0)
    assert adm.brownout_rate == 1.0
    snap = adm.snapshot()
    assert snap["state"] == "brownout" and snap["brownout_mode"] == "manual"


# -- brownout sampling -------------------------------------------------------------------


def _keys(seed: int, n: int) -> list[bytes]:
    return [hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(n)]


def test_keep_everything_when_no_brownout() -> None:
    adm, _ = make(FakeTime())
    assert all(adm.keep_in_brownout(k, "low") for k in _keys(0, 200))


@settings(max_examples=25, deadline=None)
@given(rate=st.floats(0.05, 1.0), seed=st.integers(0, 2**32))
def test_keep_in_brownout_share_determinism_and_priorities(rate: float, seed: int) -> None:
    adm, _ = make(FakeTime())
    adm.brownout(rate)
    keys = _keys(seed, 4000)
    kept = [adm.keep_in_brownout(k, "low") for k in keys]
    assert kept == [adm.keep_in_brownout(k, "low") for k in keys]  # deterministic per key
    assert abs(sum(kept) / len(keys) - rate) < 0.04  # ~5 sigma at n=4000
    assert all(adm.keep_in_brownout(k, p) for k in keys[:300] for p in ("high", "normal"))
    for k in keys[:50]:
        assert adm.keep_in_brownout(k, "low") is (int.from_bytes(k[:8], "big") / 2**64 < rate)


async def test_snapshot_shape() -> None:
    ft = FakeTime()
    adm, _ = make(ft, rate=10, burst=5)
    await adm.try_admit("acme", 2)
    adm.set_queue_depth(7)
    snap = adm.snapshot()
    assert snap == {
        "state": "normal",
        "since": snap["since"],
        "tokens": {"acme": 3.0},
        "in_flight": 0,
        "queue_depth": 7,
        "brownout_rate": None,
        "brownout_mode": None,
        "max_in_flight": 2,
        "queue_high_watermark": 100,
        "queue_low_watermark": 20,
        "throttled_by": None,
        "intake": snap["intake"],
    }
    assert snap["intake"]["records"] == 2  # admitted, append not reported yet
    assert datetime.fromisoformat(snap["since"]).timestamp() == WALL0


# -- pluggable limiter (the fleet-wide GCRA plugs in here) ---------------------------------


class CountingLimiter:
    """Answers each call from a script of waits (then grants); records every call."""

    def __init__(self, waits: list[float]) -> None:
        self.calls: list[tuple[str, float]] = []
        self.waits = waits

    async def take(self, tenant: str, n: float) -> float:
        self.calls.append((tenant, n))
        return self.waits.pop(0) if self.waits else 0.0

    def tokens(self) -> dict[str, float]:
        return {"acme": 1.0}


async def test_limiter_is_asked_once_per_batch_and_its_wait_is_the_retry_after() -> None:
    ft = FakeTime()
    lim = CountingLimiter([0.0, 0.25, 0.0, 0.5])
    adm = Admission(
        AdmissionConfig(),
        lambda t: TenantLimits(rate=100, burst=1000),
        clock=ft,
        wall_clock=ft.wall,
        sleep=ft.sleep,
        limiter=lim,
    )
    await adm.try_admit("acme", 500)
    assert lim.calls == [("acme", 500)]  # one call for the whole batch
    with pytest.raises(Rejected) as ei:
        await adm.try_admit("acme", 10)
    assert ei.value.retry_after == 0.25 and state_of(adm) is S.THROTTLED
    lim.calls.clear()
    await adm.admit("acme", 2500)  # burst-sized parts; waits what the limiter says
    assert [n for _, n in lim.calls] == [1000, 1000, 1000, 500]
    assert ft.slept == [0.5]
    assert adm.snapshot()["tokens"] == {"acme": 1.0}
