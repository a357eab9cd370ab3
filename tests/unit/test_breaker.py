"""CircuitBreaker: unit cases plus a model-based test against a tiny reference model."""

from __future__ import annotations

from datetime import datetime

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ingest.config import BreakerConfig
from ingest.pipeline.breaker import BreakerState, CircuitBreaker

WALL0 = 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL0 + self.now


def state_of(b: CircuitBreaker) -> BreakerState:
    """Read the property through a call, so mypy does not narrow it between reads."""
    return b.state


def make(
    clock: FakeClock, threshold: int = 3, timeout: float = 10.0
) -> tuple[CircuitBreaker, list[BreakerState]]:
    changes: list[BreakerState] = []
    b = CircuitBreaker(
        "pg",
        failure_threshold=threshold,
        reset_timeout=timeout,
        clock=clock,
        wall_clock=clock.wall,
        on_change=lambda name, s: changes.append(s),
    )
    return b, changes


def test_opens_at_threshold_of_consecutive_failures() -> None:
    c = FakeClock()
    b, changes = make(c)
    b.record_failure()
    b.record_failure()
    b.record_success()  # resets the count
    b.record_failure()
    b.record_failure()
    assert state_of(b) is BreakerState.CLOSED and b.allow()
    b.record_failure()
    assert state_of(b) is BreakerState.OPEN and not b.allow()
    assert changes == [BreakerState.OPEN]
    assert b.retry_after() == 10.0


def test_half_open_is_lazy_reported_and_allows_one_probe() -> None:
    c = FakeClock()
    b, changes = make(c, threshold=1)
    b.record_failure()
    c.now = 9.9
    assert b.retry_after() > 0 and not b.allow()
    c.now = 10.0
    assert state_of(b) is BreakerState.HALF_OPEN
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN]
    assert b.retry_after() == 0.0
    assert b.allow()
    assert not b.allow()  # the probe is in flight
    b.record_success()
    assert state_of(b) is BreakerState.CLOSED
    assert changes[-1] is BreakerState.CLOSED


def test_failed_probe_reopens_with_new_timer() -> None:
    c = FakeClock()
    b, changes = make(c, threshold=1)
    b.record_failure()
    c.now = 12.0
    assert b.allow()
    b.record_failure()
    assert state_of(b) is BreakerState.OPEN
    assert b.retry_after() == 10.0
    assert b.snapshot()["trips"] == 2
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN]


def test_lost_probe_is_replaced_after_reset_timeout() -> None:
    c = FakeClock()
    b, _ = make(c, threshold=1)
    b.record_failure()
    c.now = 10.0
    assert b.allow()
    c.now = 19.9
    assert not b.allow()
    c.now = 20.0
    assert b.allow()


def test_snapshot_fields() -> None:
    c = FakeClock()
    b, _ = make(c, threshold=1)
    snap = b.snapshot()
    assert snap["state"] == "closed" and snap["opened_at"] is None and snap["trips"] == 0
    c.now = 5.0
    b.record_failure()
    c.now = 8.0
    snap = b.snapshot()
    assert snap["state"] == "open"
    assert snap["consecutive_failures"] == 1
    assert datetime.fromisoformat(snap["opened_at"]).timestamp() == WALL0 + 5.0
    assert datetime.fromisoformat(snap["since"]).timestamp() == WALL0 + 5.0
    assert snap["retry_after_seconds"] == 7.0
    assert snap["opened_at"].endswith("Z")  # ingest.timefmt.iso: one format everywhere
    c.now = 40.0  # noticed late, but "since" is when the timer ran out
    snap = b.snapshot()
    assert snap["state"] == "half_open"
    assert datetime.fromisoformat(snap["since"]).timestamp() == WALL0 + 15.0


def test_from_config() -> None:
    b = CircuitBreaker.from_config(
        "neo4j", BreakerConfig(failure_threshold=2, reset_timeout_seconds=4.5)
    )
    assert (b.name, b.failure_threshold, b.reset_timeout) == ("neo4j", 2, 4.5)


class BreakerModel(RuleBasedStateMachine):
    """Reference model: state derived from a few plain variables, checked after every step."""

    THRESHOLD = 3
    TIMEOUT = 5.0

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.breaker, self.changes = make(self.clock, self.THRESHOLD, self.TIMEOUT)
        self.m_state = "closed"
        self.m_failures = 0
        self.m_opened = 0.0
        self.m_probe: float | None = None
        self.m_changes: list[str] = []

    def _m_tick(self) -> None:
        if self.m_state == "open" and self.clock.now - self.m_opened >= self.TIMEOUT:
            self.m_state = "half_open"
            self.m_probe = None
            self.m_changes.append("half_open")

    def _m_open(self) -> None:
        self.m_state = "open"
        self.m_opened = self.clock.now
        self.m_changes.append("open")

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5, 4.99, 5.0, 7.0]))
    def advance(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def allow(self) -> None:
        self._m_tick()
        if self.m_state == "closed":
            expected = True
        elif self.m_state == "open":
            expected = False
        else:
            expected = self.m_probe is None or self.clock.now - self.m_probe >= self.TIMEOUT
            if expected:
                self.m_probe = self.clock.now
        assert self.breaker.allow() is expected

    @rule()
    def success(self) -> None:
        self._m_tick()
        self.m_failures = 0
        if self.m_state == "half_open":
            self.m_state = "closed"
            self.m_changes.append("closed")
        self.breaker.record_success()

    @rule()
    def failure(self) -> None:
        self._m_tick()
        self.m_failures += 1
        if self.m_state == "half_open" or (
            self.m_state == "closed" and self.m_failures >= self.THRESHOLD
        ):
            self._m_open()
        self.breaker.record_failure()

    @precondition(lambda self: self.m_state != "closed")
    @rule()
    def peek_retry_after(self) -> None:
        self._m_tick()
        expected = self.TIMEOUT - (self.clock.now - self.m_opened) if self.m_state == "open" else 0
        assert abs(self.breaker.retry_after() - expected) < 1e-9
        assert 0.0 <= self.breaker.retry_after() <= self.TIMEOUT

    @invariant()
    def agrees_with_model(self) -> None:
        self._m_tick()
        assert self.breaker.state.value == self.m_state
        assert [s.value for s in self.changes] == self.m_changes
        snap = self.breaker.snapshot()
        assert snap["consecutive_failures"] == self.m_failures
        assert snap["trips"] == self.m_changes.count("open")


BreakerModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_breaker_matches_model = BreakerModel.TestCase
