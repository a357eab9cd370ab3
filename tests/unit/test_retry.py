"""RetryPolicy and retry_call: bounded, jittered, and never retrying what cannot succeed."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import RetryConfig
from ingest.errors import SinkError
from ingest.pipeline.retry import RetryPolicy, retry_call
from ingest.records import ReasonCode

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


def classify(exc: BaseException) -> ReasonCode | None:
    return exc.reason if isinstance(exc, SinkError) else None


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
        on_retry=lambda r, a, d: seen.append((r, a, d)),
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
