"""Bounded retries with full-jitter exponential backoff.

Full jitter (a uniform draw below an exponentially growing cap) spreads the retries of many
workers hitting the same failing sink, so they do not come back in lock-step. Three bounds
keep a record from retrying forever: attempts, total time, and the reason code itself
(only the runbook's retryable codes are retried; the rest go straight to the DLQ).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ingest.config import RetryConfig
from ingest.records import ReasonCode

R = TypeVar("R")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry; pure arithmetic, so it can be property-tested."""

    max_attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0
    max_total: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.base_delay <= 0 or self.max_delay <= 0 or self.max_total <= 0:
            raise ValueError("delays must be > 0")

    @classmethod
    def from_config(cls, cfg: RetryConfig) -> RetryPolicy:
        return cls(
            max_attempts=cfg.max_attempts,
            base_delay=cfg.base_delay_seconds,
            max_delay=cfg.max_delay_seconds,
            max_total=cfg.max_total_seconds,
        )

    def cap(self, attempt: int) -> float:
        """Upper bound of the delay after the attempt-th failure (1-based)."""
        if attempt < 1:
            raise ValueError("attempt is 1-based")
        # Clamp the exponent: 2**1000 would overflow a float long after max_delay is reached.
        exp = min(attempt - 1, 64)
        return min(self.max_delay, self.base_delay * 2.0**exp)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Delay after the attempt-th failure: uniform in [0, cap(attempt)] (full jitter)."""
        return rng.uniform(0.0, self.cap(attempt))

    def should_retry(
        self, reason: ReasonCode, attempts_made: int, elapsed: float, next_delay: float
    ) -> bool:
        """Whether one more attempt is allowed after `attempts_made` failed ones."""
        if not reason.retryable:
            return False
        if attempts_made >= self.max_attempts:
            return False
        return elapsed + next_delay <= self.max_total


async def retry_call(
    fn: Callable[[], Awaitable[R]],
    policy: RetryPolicy,
    *,
    classify: Callable[[BaseException], ReasonCode | None],
    on_retry: Callable[[ReasonCode, int, float], None] | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> R:
    """Call `fn` until it succeeds or the policy gives up; then re-raise the last exception.

    `classify` maps an exception to a ReasonCode, or None when it is not ours to retry (it
    is re-raised at once). `on_retry(reason, attempt, delay)` fires before each sleep, so
    the caller can count `ingest_retry_total` by reason.
    """
    rand = rng if rng is not None else random.Random()
    start = clock()
    slept = 0.0  # counted too, so a clock that does not see our sleeps still bounds the total
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except Exception as exc:
            reason = classify(exc)
            if reason is None:
                raise
            delay = policy.backoff(attempt, rand)
            elapsed = max(clock() - start, slept)
            if not policy.should_retry(reason, attempt, elapsed, delay):
                raise
            if on_retry is not None:
                on_retry(reason, attempt, delay)
            await sleep(delay)
            slept += delay
