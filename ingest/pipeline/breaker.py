"""Per-sink circuit breaker: stop hammering a sink that keeps failing, probe it now and then.

CLOSED counts consecutive failures and opens at the threshold. OPEN refuses everything
(the caller parks records as CIRCUIT_OPEN) until `reset_timeout` has passed; then one probe
is let through (HALF_OPEN). The probe's success closes the breaker, its failure re-opens it
with a fresh timer. The OPEN -> HALF_OPEN step is noticed lazily, when someone asks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from ingest.config import BreakerConfig
from ingest.timefmt import iso


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """One breaker per sink. Not thread-safe: it lives on the event loop."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_timeout <= 0:
            raise ValueError("reset_timeout must be > 0")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.on_change = on_change
        self._clock = clock
        self._wall = wall_clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._trips = 0
        self._opened_at: float | None = None  # monotonic, while OPEN/HALF_OPEN
        self._opened_wall: float | None = None
        self._since_wall = wall_clock()
        self._probe_at: float | None = None  # monotonic start of the probe in flight

    @classmethod
    def from_config(cls, name: str, cfg: BreakerConfig, **kw: Any) -> CircuitBreaker:
        return cls(
            name,
            failure_threshold=cfg.failure_threshold,
            reset_timeout=cfg.reset_timeout_seconds,
            **kw,
        )

    def _move(self, new: BreakerState, wall: float | None = None) -> None:
        self._state = new
        self._since_wall = self._wall() if wall is None else wall
        if self.on_change is not None:
            self.on_change(self.name, new)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._opened_wall = self._wall()
        self._probe_at = None
        self._trips += 1
        self._move(BreakerState.OPEN, self._opened_wall)

    @property
    def state(self) -> BreakerState:
        """Current state; OPEN turns HALF_OPEN here once reset_timeout has passed."""
        if (
            self._state is BreakerState.OPEN
            and self._opened_at is not None
            and self._clock() - self._opened_at >= self.reset_timeout
        ):
            self._probe_at = None
            # The transition really happened when the timer ran out, not when noticed.
            wall = None if self._opened_wall is None else self._opened_wall + self.reset_timeout
            self._move(BreakerState.HALF_OPEN, wall)
        return self._state

    def allow(self) -> bool:
        """May a call go to the sink now? In HALF_OPEN only one probe at a time.

        A probe that never reports back (its caller crashed) is given up on after
        reset_timeout, and another probe is allowed.
        """
        st = self.state
        if st is BreakerState.CLOSED:
            return True
        if st is BreakerState.OPEN:
            return False
        now = self._clock()
        if self._probe_at is None or now - self._probe_at >= self.reset_timeout:
            self._probe_at = now
            return True
        return False

    def record_success(self) -> None:
        """A call succeeded: the sink is fine. Closes a half-open breaker."""
        self._failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self._opened_at = None
            self._opened_wall = None
            self._probe_at = None
            self._move(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """A retryable sink failure. Opens at the threshold; a failed probe re-opens."""
        self._failures += 1
        st = self.state
        if st is BreakerState.HALF_OPEN or (
            st is BreakerState.CLOSED and self._failures >= self.failure_threshold
        ):
            self._open()

    def retry_after(self) -> float:
        """Seconds until the breaker turns half-open (0 unless OPEN)."""
        if self.state is not BreakerState.OPEN or self._opened_at is None:
            return 0.0
        return max(0.0, self.reset_timeout - (self._clock() - self._opened_at))

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view for /health/detailed."""
        st = self.state
        return {
            "state": st.value,
            "consecutive_failures": self._failures,
            "opened_at": None if self._opened_wall is None else iso(self._opened_wall),
            "since": iso(self._since_wall),
            "trips": self._trips,
            "retry_after_seconds": self.retry_after(),
        }
