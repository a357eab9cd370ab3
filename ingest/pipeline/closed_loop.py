"""Closed-loop admission: the webhook intake holds only what the pipeline drains in the lag budget.

Little's law: a record accepted behind B waiting records is delivered about B / r seconds
later, r being the rate at which the pipeline drains the intake. To keep that within the lag
budget (a share of the 60 s SLO) the backlog may hold at most r x budget records; past that the
front door answers 429 with Retry-After = excess / r. Hard caps in records and bytes hold
whatever the rate (disk, memory), and a floor lets a pod that has not measured its rate yet
take a first burst — which is what gets the rate measured.

r is measured, never configured. The consumer side reports the records it committed out of
the intake (`drained`); the intake reports its size (`observe`, every tick). A window in which
the backlog stayed non-empty measures capacity (the pipeline never ran dry); any other window
only shows what arrived, so it may raise the estimate but never lower it. Samples span at
least `SAMPLE_SECONDS` (the pipeline commits whole batches), then are smoothed (EWMA,
`rate_window_seconds`).

Between observations the estimate runs on: + records accepted (and those still being appended,
so 100 concurrent requests cannot all pass on one stale figure), - records drained.

A body larger than the whole bound (but within the hard caps) can only be taken into an empty
intake (one body of lag over budget). Steady traffic from others keeps the intake from ever
emptying, so such a body, once refused, holds the door (`LARGE_HOLD_GRACE` past its
Retry-After): others are refused (429) until the intake has drained and the large body, sent
again as told, is taken. A body that can never fit (more records than
`max_backlog_records`, more bytes than `max_backlog_bytes`) is refused for good (`never`:
413 at the HTTP layer), not told to retry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ingest.config import IntakeBoundConfig

SAMPLE_SECONDS = 2.0  # busy time a rate sample spans (a batch commit drains ~2000 at once)
LARGE_HOLD_GRACE = 10.0  # seconds past its Retry-After a waiting large body holds the door
DEFAULT_RECORD_BYTES = 512.0  # bytes per record assumed before any observation


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the intake is full and when to come back (seconds, >= 1). `never`: the request
    can never fit, whatever the wait (split it); `retry_after` is then meaningless."""

    reason: str
    retry_after: float
    never: bool = False


class IntakeBound:
    """The backlog bound for one intake; see the module docstring. Not thread-safe (one loop)."""

    def __init__(self, cfg: IntakeBoundConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._clock = clock
        self._observed_records = 0  # backlog at the last observation
        self._observed_bytes = 0
        self._observed_at: float | None = None
        self._accepted_records = 0  # appended since the last observation
        self._accepted_bytes = 0
        self._appending_records = 0  # admitted, append not finished yet
        self._appending_bytes = 0
        self._drained_since = 0  # drained since the last observation
        self._rate: float | None = None  # records/s the pipeline drains, when busy
        self._sample_records = 0  # accumulating a sample
        self._sample_seconds = 0.0
        self._sample_busy = True  # every window of the sample had a backlog at both ends
        self._record_bytes = DEFAULT_RECORD_BYTES
        self._held_until = -math.inf  # a refused large body holds the door until then
        self.refused = 0  # requests refused so far (for health)

    # -- what the intake and the consumers report -------------------------------------------

    def observe(self, records: int, nbytes: int) -> None:
        """The intake's size now. Closes a measurement window and updates the rate."""
        now = self._clock()
        records, nbytes = max(0, records), max(0, nbytes)
        if self._observed_at is not None:
            dt = now - self._observed_at
            if dt > 0:
                busy = self._observed_records > 0 and records > 0
                self._window(self._drained_since, dt, busy)
        if records > 0:
            self._record_bytes = max(1.0, nbytes / records)
        self._observed_records, self._observed_bytes = records, nbytes
        self._observed_at = now
        self._accepted_records = self._accepted_bytes = 0
        self._drained_since = 0

    def drained(self, n: int) -> None:
        """n records were committed out of the intake (durable downstream, deleted/acked)."""
        if n > 0:
            self._drained_since += n

    def _window(self, drained: int, dt: float, busy: bool) -> None:
        self._sample_records += drained
        self._sample_seconds += dt
        self._sample_busy = self._sample_busy and busy
        if self._sample_seconds < SAMPLE_SECONDS:
            return
        sample = self._sample_records / self._sample_seconds
        if not self._sample_busy:
            # The pipeline ran dry at some point: this shows demand, not capacity, so it
            # may raise the estimate but never lower it.
            if sample > 0 and (self._rate is None or sample > self._rate):
                self._rate = sample
        elif self._rate is None:
            self._rate = sample
        else:
            alpha = 1.0 - math.exp(-self._sample_seconds / self.cfg.rate_window_seconds)
            self._rate += alpha * (sample - self._rate)
        self._sample_records = 0
        self._sample_seconds = 0.0
        self._sample_busy = True

    # -- the bound ----------------------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        """Measured drain rate in records/s (None until measured)."""
        return self._rate

    @property
    def backlog_records(self) -> int:
        est = (
            self._observed_records
            + self._accepted_records
            + self._appending_records
            - self._drained_since
        )
        return max(0, est)

    @property
    def backlog_bytes(self) -> int:
        drained_bytes = self._drained_since * self._record_bytes
        est = self._observed_bytes + self._accepted_bytes + self._appending_bytes - drained_bytes
        return max(0, int(est))

    @property
    def limit_records(self) -> int:
        """Records the backlog may hold: rate x budget, at least the floor, at most the cap."""
        cfg = self.cfg
        by_rate = 0.0 if self._rate is None else self._rate * cfg.lag_budget_seconds
        return int(min(cfg.max_backlog_records, max(cfg.min_backlog_records, by_rate)))

    def backlog_seconds(self) -> float | None:
        """Estimated seconds of work waiting, at the measured rate."""
        if self._rate is None:
            return None
        if self._rate <= 0:
            return math.inf if self.backlog_records else 0.0
        return self.backlog_records / self._rate

    def check(self, n: int, nbytes: int) -> Refusal | None:
        """Would n records (nbytes) fit now? Refusal with Retry-After if not; never waits.

        n = 0 asks whether anything fits (the HTTP layer asks before reading a body). Until
        the intake's size has been observed once the bound is not enforced: an intake that
        cannot tell its size (the Kafka topic, for now) is not refused on a guess."""
        cfg = self.cfg
        if n > cfg.max_backlog_records or nbytes > cfg.max_backlog_bytes:
            if self._observed_at is None:
                return None
            return self._never(n, nbytes)
        if self._observed_at is None:
            return None
        records, nbytes_now = self.backlog_records, self.backlog_bytes
        limit = self.limit_records
        over_records = records + n - limit if records + n > limit else 0
        over_bytes = (
            nbytes_now + nbytes - self.cfg.max_backlog_bytes
            if nbytes_now + nbytes > self.cfg.max_backlog_bytes
            else 0
        )
        if n == 0 and records < limit and nbytes_now < self.cfg.max_backlog_bytes:
            return None
        held = self._clock() < self._held_until
        if n > limit:
            if records == 0 and nbytes_now + nbytes <= self.cfg.max_backlog_bytes:
                # One body larger than the whole budget would be refused forever, its retries
                # included: it is taken once the intake is empty (one body of lag over budget).
                self._held_until = -math.inf
                return None
            return self._hold(records)
        if n > 0 and not over_records and not over_bytes and not held:
            return None
        if n > 0 and held:
            return self._held(records)
        excess = max(float(over_records), over_bytes / self._record_bytes, 1.0)
        retry_after = self._retry_after(excess)
        if over_bytes and not over_records:
            what = f"{nbytes_now:,} bytes (limit {self.cfg.max_backlog_bytes:,})"
        else:
            what = f"{records:,} records (limit {limit:,})"
        rate = "not measured yet" if self._rate is None else f"{self._rate:,.0f} records/s"
        return Refusal(
            f"the intake holds {what}, the most the pipeline can deliver within the "
            f"{self.cfg.lag_budget_seconds:g} s lag budget at its drain rate ({rate}); "
            f"retry in {retry_after:.0f} s",
            retry_after,
        )

    def _never(self, n: int, nbytes: int) -> Refusal:
        cfg = self.cfg
        if n > cfg.max_backlog_records:
            what = (
                f"{n:,} records, more than the intake ever holds ({cfg.max_backlog_records:,}, "
                f"admission.intake.max_backlog_records): split it into requests of at most "
                f"{cfg.max_backlog_records:,} records"
            )
        else:
            what = (
                f"{nbytes:,} bytes, more than the intake ever holds ({cfg.max_backlog_bytes:,}, "
                "admission.intake.max_backlog_bytes): split it into smaller requests"
            )
        return Refusal(
            f"this request holds {what}; it can never be accepted as it is",
            cfg.max_retry_after_seconds,
            never=True,
        )

    def _drain_seconds(self, records: int) -> float:
        """Retry-After for a large body: until the backlog has drained, at the measured rate."""
        return self._retry_after(float(records))

    def _hold(self, records: int) -> Refusal:
        """Refuse a body larger than the bound while the intake is not empty, and hold the door
        for it: others are refused until it has been taken (or has not come back in time)."""
        retry_after = self._drain_seconds(records)
        self._held_until = self._clock() + retry_after + LARGE_HOLD_GRACE
        return Refusal(
            f"this request is larger than the {self.limit_records:,} records the pipeline "
            f"delivers within the {self.cfg.lag_budget_seconds:g} s lag budget: it is taken "
            f"alone, once the {records:,} records ahead of it are delivered (new requests "
            f"wait meanwhile); retry in {retry_after:.0f} s",
            retry_after,
        )

    def _held(self, records: int) -> Refusal:
        retry_after = max(self._drain_seconds(records), 1.0)
        return Refusal(
            "the intake is emptying for a request larger than the lag budget, which is "
            f"taken alone; retry in {retry_after:.0f} s",
            retry_after,
        )

    @property
    def held(self) -> bool:
        """A refused large body holds the door (others are refused until it is taken)."""
        return self._clock() < self._held_until

    def _retry_after(self, excess_records: float) -> float:
        cap = self.cfg.max_retry_after_seconds
        if self._rate is None:
            return 1.0
        if self._rate <= 0:
            return cap
        return float(min(cap, max(1.0, math.ceil(excess_records / self._rate))))

    # -- the append in between ------------------------------------------------------------------

    def reserve(self, n: int, nbytes: int) -> None:
        """n records were admitted and are being appended (count them in the backlog now)."""
        self._appending_records += n
        self._appending_bytes += nbytes

    def settle(self, n: int, nbytes: int, *, appended: bool) -> None:
        """The append of a reservation finished (appended) or failed (not appended)."""
        self._appending_records -= n
        self._appending_bytes -= nbytes
        if appended:
            self._accepted_records += n
            self._accepted_bytes += nbytes

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready, for /health/detailed `.backpressure.intake`."""
        seconds = self.backlog_seconds()
        return {
            "records": self.backlog_records,
            "bytes": self.backlog_bytes,
            "seconds": None if seconds is None else round(seconds, 1),
            "limit_records": self.limit_records,
            "limit_bytes": self.cfg.max_backlog_bytes,
            "lag_budget_seconds": self.cfg.lag_budget_seconds,
            "drain_rate": None if self._rate is None else round(self._rate, 1),
            "refused_requests": self.refused,
            "held_for_large_request": self.held,
        }
