"""The one retry layer: bounded (or patient) retries with full-jitter exponential backoff.

Every retry of a sink write or a state-store call in the service goes through `retry_call`:
the worker's per-sink retry (`Pipeline._deliver_to_sink`), its wait for state stores
(`Pipeline.until_ok`) and for disk space. Adapters never loop themselves; they classify
their driver's errors once (`SinkError(reason, retry_after=...)`, `StoreUnavailable`) and pass
on what the server said about when to come back (a 429's Retry-After, a breaker's reset).

Full jitter (a uniform draw below an exponentially growing cap) spreads the retries of many
workers hitting the same failing sink, so they do not come back in lock-step; a server's hint
is a floor under the draw. Three bounds keep a record from retrying forever: attempts, total
time, and the reason code itself (only the runbook's retryable codes are retried; the rest go
straight to the DLQ). A store outage is waited out without bounds (`RetryPolicy.patient`):
records wait for the store, they are never dropped.

Why not tenacity or stamina: the worker retries only the records of a batch that failed,
counts each retry by tenant and reason, lets an open breaker's reset time and a server's
Retry-After set the wait, stops waiting when the service drains (`Abandoned` from its
sleep), and is property-tested against a fake clock; that is this small function with a
`classify` callback, and a library would add a layer of adapters around the same loop.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ingest.config import RetryConfig
from ingest.records import ReasonCode

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Retryable:
    """`classify`'s answer for a failure worth another attempt."""

    reason: ReasonCode = ReasonCode.CONNECTION_ERROR
    retry_after: float | None = None  # the server's own hint (Retry-After, breaker reset)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry; pure arithmetic, so it can be property-tested.
    `math.inf` attempts and total time: retry until it works (state stores)."""

    max_attempts: float = 6
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

    @classmethod
    def patient(cls, base_delay: float, max_delay: float) -> RetryPolicy:
        """No bound on attempts or time: for outages that must be waited out."""
        return cls(math.inf, base_delay, max_delay, math.inf)

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

    def delay(self, attempt: int, rng: random.Random, hint: float | None = None) -> float:
        """The backoff, but never sooner than the server asked (`hint`, seconds)."""
        drawn = self.backoff(attempt, rng)
        return drawn if hint is None or not hint > drawn else hint

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
    classify: Callable[[Exception], Retryable | None],
    on_retry: Callable[[Exception, Retryable, int, float], None] | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> R:
    """Call `fn` until it succeeds or the policy gives up; then re-raise the last exception.

    `classify` says whether an exception is worth another attempt (and why, and what the
    server hinted), or None when it is not ours to retry (re-raised at once).
    `on_retry(exc, verdict, attempt, delay)` fires before each sleep, so the caller can log
    and count `ingest_retry_total` by reason. Whatever `sleep` raises (the worker's
    `Abandoned` when the service stops) ends the retries.
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
            verdict = classify(exc)
            if verdict is None:
                raise
            delay = policy.delay(attempt, rand, verdict.retry_after)
            elapsed = max(clock() - start, slept)
            if not policy.should_retry(verdict.reason, attempt, elapsed, delay):
                raise
            if on_retry is not None:
                on_retry(exc, verdict, attempt, delay)
            await sleep(delay)
            slept += delay
