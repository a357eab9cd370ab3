"""The one retry layer (RetryPolicy, retry_call): bounded, jittered, honouring the server's
hint, patient for outages, and never retrying what cannot succeed."""

from __future__ import annotations

import contextlib
import math
import random
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import RetryConfig
from ingest.errors import SinkError
from ingest.pipeline.retry import Retryable, RetryPolicy, retry_call
from ingest.records import ReasonCode
from ingest.sinks.base import retry_after_seconds

RETRYABLE = [r for r in ReasonCode if r.retryable]
FATAL = [r for r in ReasonCode if not r.retryable]

policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 12),
    base_delay=st.floats(0.001, 5.0),
    max_delay=st.floats(0.001, 30.0),
    max_total=st.floats(0.01, 120.0),
)


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        assert delay >= 0
        self.slept.append(delay)
        self.now += delay


def classify(exc: Exception) -> Retryable | None:
    if not isinstance(exc, SinkError):
        return None
    hint = exc.detail.get("retry_after_seconds")
    return Retryable(exc.reason, hint)


def test_from_config_maps_fields() -> None:
    cfg = RetryConfig(
        max_attempts=3, base_delay_seconds=0.5, max_delay_seconds=4, max_total_seconds=9
    )
    assert RetryPolicy.from_config(cfg) == RetryPolicy(3, 0.5, 4.0, 9.0)


def test_cap_doubles_until_max_delay() -> None:
    p = RetryPolicy(base_delay=0.2, max_delay=1.0)
    assert [p.cap(a) for a in (1, 2, 3, 4, 5)] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    assert p.cap(10_000) == 1.0  # no float overflow for absurd attempt numbers


@settings(max_examples=200, deadline=None)
@given(policies, st.integers(1, 200), st.integers(0, 2**32))
def test_backoff_within_zero_and_cap(p: RetryPolicy, attempt: int, seed: int) -> None:
    cap = min(p.max_delay, p.base_delay * 2 ** min(attempt - 1, 64))
    assert p.cap(attempt) == pytest.approx(cap)
    d = p.backoff(attempt, random.Random(seed))
    assert 0.0 <= d <= p.cap(attempt)


@settings(max_examples=100, deadline=None)
@given(policies, st.integers(1, 60))
def test_cap_grows_exponentially_then_flat(p: RetryPolicy, attempt: int) -> None:
    a, b = p.cap(attempt), p.cap(attempt + 1)
    if a < p.max_delay:
        assert b == pytest.approx(min(p.max_delay, 2 * a))
    else:
        assert b == p.max_delay


def test_jitter_actually_varies() -> None:
    p = RetryPolicy(base_delay=1.0, max_delay=8.0)
    rng = random.Random(7)
    draws = {p.backoff(4, rng) for _ in range(50)}
    assert len(draws) > 40
    assert max(draws) > 4.0  # uses the whole [0, 8] range, not a fixed delay


@given(st.sampled_from(FATAL), st.integers(0, 5), st.floats(0, 10))
def test_never_retries_non_retryable(reason: ReasonCode, made: int, elapsed: float) -> None:
    assert not RetryPolicy().should_retry(reason, made, elapsed, 0.0)


def test_should_retry_bounds() -> None:
    p = RetryPolicy(max_attempts=3, max_total=10.0)
    r = ReasonCode.SINK_TIMEOUT
    assert p.should_retry(r, 2, 0.0, 0.0)
    assert not p.should_retry(r, 3, 0.0, 0.0)
    assert p.should_retry(r, 1, 9.0, 1.0)
    assert not p.should_retry(r, 1, 9.0, 1.5)


async def test_success_after_transient_failures() -> None:
    ft = FakeTime()
    calls = 0
    seen: list[tuple[ReasonCode, int, float]] = []

    async def fn() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise SinkError(ReasonCode.CONNECTION_ERROR, "refused")
        return "ok"

    out = await retry_call(
        fn,
        RetryPolicy(),
        classify=classify,
        on_retry=lambda e, v, a, d: seen.append((v.reason, a, d)),
        sleep=ft.sleep,
        clock=ft.clock,
        rng=random.Random(1),
    )
    assert out == "ok" and calls == 3
    assert [(r, a) for r, a, _ in seen] == [
        (ReasonCode.CONNECTION_ERROR, 1),
        (ReasonCode.CONNECTION_ERROR, 2),
    ]
    assert [d for _, _, d in seen] == ft.slept


async def test_unclassified_exception_is_reraised_at_once() -> None:
    ft = FakeTime()
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await retry_call(fn, RetryPolicy(), classify=classify, sleep=ft.sleep, clock=ft.clock)
    assert calls == 1 and ft.slept == []


@settings(max_examples=150, deadline=None)
@given(
    p=policies,
    reasons=st.lists(st.sampled_from(list(ReasonCode)), min_size=1, max_size=20),
    succeed_after=st.integers(0, 25),
    seed=st.integers(0, 2**32),
    frozen_clock=st.booleans(),
)
async def test_retry_call_respects_every_bound(
    p: RetryPolicy,
    reasons: list[ReasonCode],
    succeed_after: int,
    seed: int,
    frozen_clock: bool,
) -> None:
    ft = FakeTime()
    calls = 0
    raised: list[SinkError] = []

    async def fn() -> int:
        nonlocal calls
        calls += 1
        if calls > succeed_after:
            return calls
        err = SinkError(reasons[(calls - 1) % len(reasons)], "boom")
        raised.append(err)
        raise err

    # A frozen clock must not let the total sleep exceed max_total either.
    clock = (lambda: 0.0) if frozen_clock else ft.clock
    try:
        result = await retry_call(
            fn, p, classify=classify, sleep=ft.sleep, clock=clock, rng=random.Random(seed)
        )
    except SinkError as exc:
        assert exc is raised[-1]  # the last exception, unchanged
        gave_up = True
    else:
        assert result == calls
        gave_up = False
    assert calls <= p.max_attempts
    assert sum(ft.slept) <= p.max_total + 1e-9
    for i, d in enumerate(ft.slept, start=1):
        assert 0 <= d <= p.cap(i)
    # every failure that was retried had a retryable reason
    assert all(e.reason.retryable for e in raised[: len(ft.slept)])
    # Replay the jitter draws: the sleeps are exactly the first draws, and giving up early
    # with a retryable reason means the next draw would have crossed max_total.
    rng = random.Random(seed)
    draws = [p.backoff(i, rng) for i in range(1, calls + 1)]
    assert ft.slept == draws[: len(ft.slept)]
    if gave_up and raised[-1].reason.retryable and calls < p.max_attempts:
        assert sum(ft.slept) + draws[calls - 1] > p.max_total
    if raised and not raised[0].reason.retryable:
        assert calls == 1


hints = st.one_of(st.none(), st.floats(0.0, 200.0))


@settings(max_examples=150, deadline=None)
@given(
    p=policies,
    hints=st.lists(hints, min_size=1, max_size=12),
    succeed_after=st.integers(0, 15),
    seed=st.integers(0, 2**32),
)
async def test_a_server_hint_is_a_floor_and_the_bounds_still_hold(
    p: RetryPolicy, hints: list[float | None], succeed_after: int, seed: int
) -> None:
    """A 429's Retry-After (or a breaker's reset) is never undercut, and never stretches the
    retries past max_total: a hint too long to fit gives up instead of sleeping past it."""
    ft = FakeTime()
    calls = 0

    async def fn() -> int:
        nonlocal calls
        calls += 1
        if calls > succeed_after:
            return calls
        hint = hints[(calls - 1) % len(hints)]
        raise SinkError(ReasonCode.RATE_LIMITED, "slow down", retry_after=hint)

    with contextlib.suppress(SinkError):
        await retry_call(
            fn, p, classify=classify, sleep=ft.sleep, clock=ft.clock, rng=random.Random(seed)
        )
    rng = random.Random(seed)
    for i, slept in enumerate(ft.slept, start=1):
        drawn = p.backoff(i, rng)
        hint = hints[(i - 1) % len(hints)]
        assert slept == max(drawn, hint or 0.0)  # the draw, or the server's hint if longer
    assert sum(ft.slept) <= p.max_total + 1e-9
    assert calls <= p.max_attempts


@settings(max_examples=100, deadline=None)
@given(
    base=st.floats(0.001, 1.0),
    cap=st.floats(0.001, 10.0),
    failures=st.integers(0, 300),
    seed=st.integers(0, 2**32),
)
async def test_patient_policy_waits_out_any_outage(
    base: float, cap: float, failures: int, seed: int
) -> None:
    """State stores: however long the outage, the call ends only by succeeding, and no
    single wait exceeds the cap."""
    ft = FakeTime()
    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        if calls <= failures:
            raise SinkError(ReasonCode.CONNECTION_ERROR, "down")
        return "up"

    p = RetryPolicy.patient(base, cap)
    out = await retry_call(
        fn, p, classify=classify, sleep=ft.sleep, clock=ft.clock, rng=random.Random(seed)
    )
    assert out == "up" and calls == failures + 1
    assert len(ft.slept) == failures and all(0 <= d <= cap for d in ft.slept)
    assert p.max_attempts == math.inf and p.max_total == math.inf


async def test_whatever_sleep_raises_ends_the_retries() -> None:
    """The worker's sleep raises Abandoned when the service stops: no further attempt."""
    calls = 0

    class Stop(Exception):
        pass

    async def fn() -> None:
        nonlocal calls
        calls += 1
        raise SinkError(ReasonCode.CONNECTION_ERROR, "down")

    async def sleep(delay: float) -> None:
        raise Stop

    with pytest.raises(Stop):
        await retry_call(fn, RetryPolicy.patient(0.1, 1.0), classify=classify, sleep=sleep)
    assert calls == 1


# -- server hints: an HTTP Retry-After as the sinks pass it on ------------------------------


@given(st.integers(0, 10**9))
def test_retry_after_delta_seconds(n: int) -> None:
    assert retry_after_seconds(str(n)) == float(n)
    assert retry_after_seconds(f"  {n} ") == float(n)


@given(st.integers(-10**6, 10**6), st.floats(1e9, 2e9))
def test_retry_after_http_date_is_seconds_from_now(offset: int, now: float) -> None:
    when = formatdate(int(now) + offset, usegmt=True)  # e.g. "Wed, 21 Oct 2015 07:28:00 GMT"
    assert retry_after_seconds(when, now=now) == max(0.0, int(now) + offset - now)


@given(st.one_of(st.text(), st.sampled_from(["²", "٣", "9" * 400, "-1", "1.5", "Wed, 99 Foo"])))
def test_retry_after_never_raises_and_is_never_negative(value: str) -> None:
    got = retry_after_seconds(value)
    assert got is None or got >= 0
