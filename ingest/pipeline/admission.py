"""Admission control: per-tenant token buckets, the in-flight semaphore, the backpressure state.

Everything that enters the pipeline passes here. Push sources (webhooks) cannot be made to
wait, so `try_admit` answers at once and the HTTP layer turns a refusal into 429/503; pull
sources simply read more slowly (`admit` waits). Push is closed-loop: besides the tenant's
token bucket (fairness between tenants), the intake backlog is bounded by what the pipeline
drains within the lag budget (`ingest.pipeline.closed_loop`). The state machine is what
operators see as `ingest_backpressure_state` and steer with /admin/drain, /admin/pause,
/admin/brownout and /admin/resume. Time-based transitions (throttled expiring, automatic
brownout) are noticed lazily when `state` is read, so nothing needs a timer task.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from enum import StrEnum
from typing import Any, NoReturn, Protocol

from ingest.config import AdmissionConfig, TenantLimits
from ingest.pipeline.closed_loop import IntakeBound, Let, Refusal
from ingest.timefmt import iso

# Seconds a wait or refusal keeps the state "throttled": long enough that an operator polling
# health once a second, or a pod's control plane folding in its workers' reports, sees it.
THROTTLE_WINDOW = 5.0
_EPS = 1e-9  # float slack, so a bucket refilled for exactly n tokens hands them out


class BackpressureState(StrEnum):
    NORMAL = "normal"
    THROTTLED = "throttled"
    BROWNOUT = "brownout"
    DRAIN = "drain"
    PAUSED = "paused"


STATE_VALUES: dict[BackpressureState, int] = {
    BackpressureState.NORMAL: 0,
    BackpressureState.THROTTLED: 1,
    BackpressureState.BROWNOUT: 2,
    BackpressureState.DRAIN: 3,
    BackpressureState.PAUSED: 4,
}


class TokenBucket:
    """Classic token bucket: `rate` tokens per second, at most `burst` saved up. Starts full."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def try_take(self, n: float) -> bool:
        """Take n tokens if they are there; never blocks."""
        self._refill()
        if n <= self._tokens + _EPS:
            self._tokens -= n
            return True
        return False

    def wait_time(self, n: float) -> float:
        """Seconds until n tokens are there; inf if n > burst (callers split such requests)."""
        if n > self.burst:
            return math.inf
        self._refill()
        return max(0.0, (n - self._tokens) / self.rate)


class RateLimiter(Protocol):
    """A per-tenant rate limit, taken a batch at a time (one call per batch, not per record).

    `LocalRateLimiter` (token buckets in this process) serves embedded mode; the fleet-wide
    GCRA in Redis (`ingest.state.ratelimit`) holds a tenant's limit across every pod.
    """

    async def take(self, tenant: str, n: float) -> float:
        """Take n tokens at once or none: 0.0 when taken, else the seconds until n would be
        there (math.inf when n exceeds the tenant's burst: split the request)."""
        ...

    def tokens(self) -> dict[str, float]:
        """Tokens left per tenant (as last seen), for /health/detailed."""
        ...


class LocalRateLimiter:
    """Token buckets in this process: the embedded-mode limiter."""

    def __init__(
        self,
        limits_for: Callable[[str], TenantLimits],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits_for = limits_for
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def bucket(self, tenant: str) -> TokenBucket:
        b = self._buckets.get(tenant)
        if b is None:
            lim = self._limits_for(tenant)
            b = self._buckets[tenant] = TokenBucket(lim.rate, lim.burst, self._clock)
        return b

    async def take(self, tenant: str, n: float) -> float:
        b = self.bucket(tenant)
        return 0.0 if b.try_take(n) else b.wait_time(n)  # wait_time: inf past the burst

    def tokens(self) -> dict[str, float]:
        return {t: b.tokens for t, b in self._buckets.items()}


class Rejected(Exception):
    """Work refused at the door. `reason` is for humans; `state` and `retry_after` for HTTP.
    `too_large`: the request can never be admitted as it is, whatever the wait (more records
    than the tenant's burst or than the intake ever holds): split it (HTTP 413)."""

    def __init__(
        self,
        state: BackpressureState,
        reason: str,
        retry_after: float | None = None,
        *,
        too_large: bool = False,
    ) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason
        self.retry_after = retry_after
        self.too_large = too_large


class Admission:
    """The pipeline's front door: rate limits, concurrency and operator-set modes."""

    def __init__(
        self,
        cfg: AdmissionConfig,
        limits_for: Callable[[str], TenantLimits],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_change: Callable[[BackpressureState], None] | None = None
        self._limits_for = limits_for
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep
        self.limiter: RateLimiter = limiter or LocalRateLimiter(limits_for, clock)
        self._sem = asyncio.Semaphore(cfg.max_in_flight)
        self._in_flight = 0
        self._paused = False
        self._draining = False
        self._manual_rate: float | None = None
        self._auto_brownout = False
        self._depth = 0
        self._above_since: float | None = None  # monotonic; depth > high watermark since then
        self._throttled_until = -math.inf
        self._throttle_reason: str | None = None
        self.intake = IntakeBound(cfg.intake, clock)
        self._wake = asyncio.Event()  # set unless paused (or when draining: waiters must leave)
        self._wake.set()
        # set while paused or draining / while neither: a source runner's read and its hold
        # follow an operator's pause and resume at once (`until_held`, `until_free`)
        self._held = asyncio.Event()
        self._free = asyncio.Event()
        self._free.set()
        self._state = BackpressureState.NORMAL
        self._since = wall_clock()

    # -- state ---------------------------------------------------------------------------

    def _compute(self, now: float) -> BackpressureState:
        if (
            not self._auto_brownout
            and self._above_since is not None
            and now - self._above_since >= self.cfg.brownout_after_seconds
        ):
            self._auto_brownout = True
        if self._paused:
            return BackpressureState.PAUSED
        if self._draining:
            return BackpressureState.DRAIN
        if self._manual_rate is not None or self._auto_brownout:
            return BackpressureState.BROWNOUT
        if now < self._throttled_until:
            return BackpressureState.THROTTLED
        return BackpressureState.NORMAL

    def _refresh(self) -> BackpressureState:
        new = self._compute(self._clock())
        if new is not self._state:
            self._state = new
            self._since = self._wall()
            if self.on_change is not None:
                self.on_change(new)
        return new

    @property
    def state(self) -> BackpressureState:
        """Precedence: paused > drain > brownout > throttled > normal. Throttled: in the last
        THROTTLE_WINDOW seconds a tenant waited for tokens or was refused, or the intake was
        at its bound."""
        return self._refresh()

    @property
    def since(self) -> float:
        """Wall time of the last change of `state`."""
        self._refresh()
        return self._since

    @property
    def brownout_rate(self) -> float | None:
        """Share of low-priority records kept, while brownout (manual or automatic) is on."""
        self._refresh()
        if self._manual_rate is not None:
            return self._manual_rate
        return self.cfg.brownout_rate if self._auto_brownout else None

    @property
    def brownout_mode(self) -> str | None:
        self._refresh()
        if self._manual_rate is not None:
            return "manual"
        return "automatic" if self._auto_brownout else None

    # -- tokens --------------------------------------------------------------------------

    def _throttle(self, reason: str) -> None:
        self._throttled_until = self._clock() + THROTTLE_WINDOW
        self._throttle_reason = reason
        self._refresh()

    def _refuse_full(self, refusal: Refusal) -> NoReturn:
        self.intake.refused += 1
        if refusal.never:  # the request is refused, not the intake full: no throttled state
            raise Rejected(BackpressureState.THROTTLED, refusal.reason, too_large=True)
        self._throttle("intake_backlog")
        raise Rejected(BackpressureState.THROTTLED, refusal.reason, refusal.retry_after)

    def _refuse_if_closed(self) -> None:
        st = self._refresh()
        if st is BackpressureState.PAUSED:
            raise Rejected(st, "ingest is paused by an operator (POST /admin/resume to resume)")
        if st is BackpressureState.DRAIN:
            raise Rejected(st, "ingest is draining: finishing in-flight work, accepting none")

    def check_open(
        self,
        tenant: str = "",
        declared_bytes: int = 0,
        source: str = "",
        authenticated: bool = False,
    ) -> Let | None:
        """Push path, before reading a body: raise Rejected if nothing could be admitted now
        (paused, draining, or the intake backlog at its bound), so refusing costs no parsing.
        `declared_bytes` (Content-Length) tells a large body's sender its place in line;
        `source`: the peer host; `authenticated`: the headers alone authenticated it (an API
        key). A `Let` (a large sender's turn at the bound) must be handed back to `body_read`
        once the body was read (or not), whatever came of it."""
        self._refuse_if_closed()
        answer = self.intake.check_open(tenant, declared_bytes, source, authenticated)
        if isinstance(answer, Refusal):
            self._refuse_full(answer)
        return answer

    def body_read(self, let: Let) -> None:
        """The body of a `Let` from `check_open` was read (or not), whatever came of it."""
        self.intake.body_read(let)

    def auth_failed(self, tenant: str, source: str) -> None:
        """A webhook naming `tenant` from peer host `source` failed authentication."""
        self.intake.auth_failed(tenant, source)

    async def try_admit(self, tenant: str, n: int, nbytes: int = 0, source: str = "") -> None:
        """Push path: admit n records (nbytes) into the intake now or raise Rejected; never
        waits (one limiter call). Admitted records count in the intake backlog at once; the
        caller reports the end of its append with `appended`. A request the intake bound
        refuses takes no tokens. `source`: the peer host it came from (authenticated)."""
        self._refuse_if_closed()
        if n <= 0:
            return
        lim = self._limits_for(tenant)
        if n > lim.burst:  # never fits the tenant's bucket, whatever the wait
            raise Rejected(
                BackpressureState.THROTTLED,
                f"this request holds {n:,} records, more than tenant '{tenant}' may send at "
                f"once (its burst, {lim.burst:,.0f}): split it into requests of at most "
                f"{lim.burst:,.0f} records; it can never be accepted as it is",
                too_large=True,
            )
        refusal = self.intake.check(n, nbytes, tenant, source)
        if refusal is not None:
            self._refuse_full(refusal)
        self.intake.reserve(n, nbytes)  # before the await: concurrent requests see it
        try:
            wait = await self.limiter.take(tenant, n)
        except BaseException:
            self.intake.settle(n, nbytes, appended=False)
            raise
        if wait <= 0:
            return
        self.intake.settle(n, nbytes, appended=False)
        self._throttle("tenant_rate")
        if math.isinf(wait):  # the limits changed under us (a fleet-wide limiter's burst)
            raise Rejected(
                BackpressureState.THROTTLED,
                f"this request holds {n:,} records, more than tenant '{tenant}' may send at "
                "once (its burst): split it into smaller requests",
                too_large=True,
            )
        raise Rejected(
            BackpressureState.THROTTLED,
            f"tenant '{tenant}' is over its rate of {lim.rate:g} records/s",
            retry_after=wait,
        )

    def appended(self, n: int, nbytes: int, *, ok: bool) -> None:
        """The intake append of an admitted request finished (ok) or failed."""
        if n > 0:
            self.intake.settle(n, nbytes, appended=ok)

    async def admit(self, tenant: str, n: int) -> None:
        """Pull path: wait for n tokens (in burst-sized parts), wait while paused.

        Raises Rejected(DRAIN) in drain, also if drain starts while waiting.
        """
        burst = self._limits_for(tenant).burst
        remaining = float(n)
        while remaining > 0:
            await self.wait_while_paused()
            self._refuse_if_closed()
            part = min(remaining, burst)
            wait = await self.limiter.take(tenant, part)
            if wait <= 0:
                remaining -= part
                continue
            self._throttle("tenant_rate")
            await self._sleep(wait if math.isfinite(wait) else 1.0)  # inf: limits changed
            self._throttle("tenant_rate")

    # -- concurrency ---------------------------------------------------------------------

    @asynccontextmanager
    async def _hold(self) -> AsyncIterator[None]:
        async with self._sem:
            self._in_flight += 1
            try:
                yield
            finally:
                self._in_flight -= 1

    def in_flight(self) -> AbstractAsyncContextManager[None]:
        """Hold one of cfg.max_in_flight slots for a batch in the sinks."""
        return self._hold()

    @property
    def in_flight_count(self) -> int:
        return self._in_flight

    # -- queue depth and automatic brownout ----------------------------------------------

    def set_queue_depth(self, depth: int) -> None:
        """Feed the current queue depth; drives automatic brownout with hysteresis.

        Enter once depth has stayed above the high watermark for brownout_after_seconds;
        leave only when it drops below the low watermark, so it cannot flap in between.
        """
        self._depth = depth
        if depth > self.cfg.queue_high_watermark:
            if self._above_since is None:
                self._above_since = self._clock()
        else:
            self._above_since = None
            if depth < self.cfg.queue_low_watermark:
                self._auto_brownout = False
        self._refresh()

    @property
    def queue_depth(self) -> int:
        return self._depth

    # -- operator controls ---------------------------------------------------------------

    def _sync_wake(self) -> None:
        if self._paused and not self._draining:
            self._wake.clear()
        else:
            self._wake.set()
        if self._paused or self._draining:
            self._free.clear()
            self._held.set()
        else:
            self._held.clear()
            self._free.set()

    def drain(self) -> None:
        self._draining = True
        self._sync_wake()
        self._refresh()

    def pause(self) -> None:
        self._paused = True
        self._sync_wake()
        self._refresh()

    def resume(self) -> None:
        """Clear paused, drain and brownout (manual and automatic).

        Automatic brownout may come back: its timer restarts now if the queue is still deep.
        """
        self._paused = False
        self._draining = False
        self._manual_rate = None
        self._auto_brownout = False
        self._above_since = self._clock() if self._depth > self.cfg.queue_high_watermark else None
        self._sync_wake()
        self._refresh()

    def brownout(self, rate: float | None = None) -> None:
        """Manual brownout keeping `rate` (in (0, 1]) of low-priority records."""
        r = self.cfg.brownout_rate if rate is None else rate
        if not 0.0 < r <= 1.0:
            raise ValueError(f"brownout rate must be in (0, 1], got {r}")
        self._manual_rate = r
        self._refresh()

    def control(self) -> dict[str, Any]:
        """What a pod's control plane hands its workers: the operator modes in force and the
        effective brownout rate (manual, or automatic from the pod's queue depth)."""
        return {
            "paused": self._paused,
            "draining": self._draining,
            "brownout_rate": self.brownout_rate,
        }

    def apply_control(self, control: dict[str, Any]) -> None:
        """A worker takes its control plane's modes as its own (see `control`)."""
        self._paused = bool(control.get("paused"))
        self._draining = bool(control.get("draining"))
        rate = control.get("brownout_rate")
        self._manual_rate = float(rate) if rate is not None else None
        self._sync_wake()
        self._refresh()

    def keep_in_brownout(self, dedupe_key: bytes, priority: str) -> bool:
        """Deterministic sampling: the same record is kept or dropped on every worker/retry."""
        if priority != "low":
            return True
        rate = self.brownout_rate
        if rate is None:
            return True
        return int.from_bytes(dedupe_key[:8], "big") / 2**64 < rate

    async def until_held(self) -> None:
        """Return once paused or draining (state PAUSED or DRAIN); at once if so now."""
        await self._held.wait()

    async def until_free(self) -> None:
        """Return once neither paused nor draining; at once if so now."""
        await self._free.wait()

    async def wait_while_paused(self) -> None:
        """Return at once unless paused; otherwise on resume (or drain)."""
        while self._paused and not self._draining:
            await self._wake.wait()

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view for /health/detailed `.backpressure`."""
        st = self.state
        return {
            "state": st.value,
            "since": iso(self._since),
            "tokens": self.limiter.tokens(),
            "in_flight": self._in_flight,
            "queue_depth": self._depth,
            "brownout_rate": self.brownout_rate,
            "brownout_mode": self.brownout_mode,
            "max_in_flight": self.cfg.max_in_flight,
            "queue_high_watermark": self.cfg.queue_high_watermark,
            "queue_low_watermark": self.cfg.queue_low_watermark,
            "throttled_by": self._throttle_reason if st is BackpressureState.THROTTLED else None,
            "intake": self.intake.snapshot(),
        }
