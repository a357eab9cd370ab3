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
emptying, so such a body, once refused, holds the door: others are refused (429) until the
intake has drained and the large body, sent again as told, is taken. Before the hold was
bounded, every re-send renewed it: one tenant re-sending a large body in a loop kept everyone
else out for as long as it went on. The rules now (a "large body" is one over the bound):

- Large senders wait in line, first refused first served: a large body refused (a hold in
  force, the others' turn, another ahead) gives its tenant a place at the end of the line,
  and its Retry-After says about when its turn comes (the hold ahead, its drain and the
  others' turn after it, one such turn per sender ahead; at most `max_retry_after_seconds`).
  Re-sending neither moves a place up nor gets a tenant an earlier turn than a patient one
  refused before it (the hold went to whoever re-sent first after the others' turn). A place
  lapses if its tenant is not back within `LARGE_HOLD_GRACE` s of its Retry-After (a client
  gone cannot block the ones behind), and the line keeps at most `_QUEUE_KEPT` tenants (the
  door checks before authentication: any client can name tenants): a newcomer to a full line
  is refused without a place. O(1) a request: two ordered dicts (by place, by last re-send).
  The door refuses before reading a body while the backlog is at its bound, so the place is
  also taken there, from the declared size (`check_open`: bytes / the bytes per record the
  intake holds; a compressed body is underestimated and races as before), by a tenant whose
  body was counted before from the same peer host (that is before authentication, so only a
  host that authenticated as the tenant, and failed no signature since, acts on the line for
  it; a tenant never seen by this pod gets its place once its first body is counted); the
  first in line is let through there, one body read at a time, and leaves the line if no
  large body of it is counted within `LARGE_HOLD_GRACE` s.
- One hold at a time, for the first in line (or a large sender when no one is in line),
  granted when its large body is refused behind a non-empty intake and the others have had
  their turn. Its end is fixed when granted: G = the drain time of the backlog ahead (at most
  `max_retry_after_seconds`) + `LARGE_HOLD_GRACE`. Nothing renews or extends it: a re-send
  before its Retry-After is refused with the time still to wait.
- While it holds, only the holder's large body is taken, once the intake is empty (the hold
  ends there); other large bodies wait in line; every other request, the holder's smaller
  ones included, gets 429 with Retry-After = what is left of the hold. So no one is refused
  because of a hold for longer than G <= `max_retry_after_seconds` + `LARGE_HOLD_GRACE`, and
  a holder that never comes back (a client gone) holds the door G at most.
- A large body that had the door for D = T + G (T: its drain time; G: its hold, 0 if it was
  taken alone; a lapsed hold: T = 0) is followed by the others' turn: until it has drained
  and D more, no large body of anyone is held for; its tenant's next one waits D more again
  before it takes a place in line. A large body (the first in line's, or anyone's when no
  one is in line) is taken alone whenever the intake is empty, except in the others' turn if
  a request within the bound of another tenant was refused since the last large body had
  the door: everyone refused because of a hold is told to wait >= 10 s (what is left of
  it), so "refused in the last 10 s", the rule before, let the holder's next body in while
  they waited as told. A small sender that waits as told is thus let in again within one
  hold and the drain of the large body taken at its end down to the bound (plus rounding):
  G + (body - bound) / rate. When no one else was refused, taking it wastes nothing: it
  never makes the backlog exceed max(bound, that one body), and its lag is its own.
A large body refused without a hold is told when its turn comes. `/health/detailed`
`.backpressure.intake.hold` shows the holder and the seconds left, `hold_free_in_seconds` when
the next hold may be granted, `hold_paused` the tenants whose next large body waits (seconds
left), `hold_queue_length` and `hold_queue` (the first 10 in line, in order). A body that can
never fit (more records than `max_backlog_records`, more bytes than `max_backlog_bytes`) is
refused for good (`never`: 413 at the HTTP layer), not told to retry.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any

from ingest.config import IntakeBoundConfig

SAMPLE_SECONDS = 2.0  # busy time a rate sample spans (a batch commit drains ~2000 at once)
LARGE_HOLD_GRACE = 10.0  # seconds past its Retry-After a waiting large body holds the door
_QUEUE_KEPT = 1024  # large senders waiting in line at most (a full line: 429, not queued)
_QUEUE_SHOWN = 10  # the first of them shown by /health/detailed
_KNOWN_KEPT = 4096  # tenants whose body was counted (authenticated), the latest
_BODY_WAIT = 3 * LARGE_HOLD_GRACE  # a place let through before its body is read waits so long
_READ_KEPT = 600.0  # a body let through not handed back (never: `body_read` in a finally) so long
DEFAULT_RECORD_BYTES = 512.0  # bytes per record assumed before any observation


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the intake is full and when to come back (seconds, >= 1). `never`: the request
    can never fit, whatever the wait (split it); `retry_after` is then meaningless."""

    reason: str
    retry_after: float
    never: bool = False


@dataclass(frozen=True, slots=True)
class Hold:
    """The door held for one tenant's body larger than the bound (see the module docstring)."""

    tenant: str
    granted_at: float
    until: float  # fixed when granted: never renewed or extended
    limit: int  # the bound when granted: the holder's bodies above it are "the large body"
    records: int = 0  # the holder's large body when granted (to tell the next in line)

    @property
    def length(self) -> float:
        return self.until - self.granted_at


@dataclass(slots=True)
class _InLine:
    """A large sender waiting in line for the door (see the module docstring)."""

    seq: int  # its place: the order of first refusal
    records: int  # its last large body
    seen: float  # its last re-send
    lapses: float  # dropped from the line then unless re-sent: its Retry-After + grace
    let_through: float | None = None  # first let past the check before its body was read


@dataclass(frozen=True, slots=True)
class Let:
    """A body let through `check_open` at the bound (the first in line's turn): read it, then
    hand this back to `body_read` whatever became of it. One at a time."""

    tenant: str
    source: str  # the peer host it came from
    ticket: int
    at: float


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
        self._hold: Hold | None = None  # a refused large body holds the door
        self._hold_free_at = -math.inf  # no hold is granted to anyone before then
        self._hold_paused: dict[str, float] = {}  # tenant -> no large body of it before then
        self._door_since = -math.inf  # the last large body had the door from then (held/taken)
        self._line: OrderedDict[str, _InLine] = OrderedDict()  # large senders, first refused first
        self._line_seen: OrderedDict[str, None] = OrderedDict()  # the same, last re-sent last
        self._line_seq = 0
        # (tenant, peer host): a request of that tenant from that host authenticated (a body
        # counted, or an API key); only these act on the line before authentication
        self._known: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._reading: Let | None = None  # the one body read at the bound before authentication
        self._tickets = 0
        # the newest refusal of a request within the bound, and the newest of another tenant:
        # enough to tell whether a tenant other than a given one was refused since a time
        self._refused_last: tuple[str | None, float] = (None, -math.inf)
        self._refused_other: tuple[str | None, float] = (None, -math.inf)
        self.refused = 0  # requests refused so far (for health)

    # -- what the intake and the consumers report -------------------------------------------

    def accepted_so_far(self) -> tuple[int, int]:
        """(records, bytes) appended since the last observation: take it just before reading
        the intake's size, and hand it to `observe` with that size."""
        return self._accepted_records, self._accepted_bytes

    def observe(self, records: int, nbytes: int, read_after: tuple[int, int] | None = None) -> None:
        """The intake's size now. Closes a measurement window and updates the rate.

        `read_after`: `accepted_so_far()` taken before the size was read. Only those appends
        are known to be in the size; one that finished while the read ran stays counted on
        top (counted twice for one tick at worst, never missed: a backlog read before an
        append committed, with every accepted count dropped, let the door admit past the
        bound for a tick). Without it, every accepted count is taken to be in the size."""
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
        if read_after is None:
            self._accepted_records = self._accepted_bytes = 0
        else:
            self._accepted_records = max(0, self._accepted_records - read_after[0])
            self._accepted_bytes = max(0, self._accepted_bytes - read_after[1])
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

    def check(self, n: int, nbytes: int, tenant: str = "", source: str = "") -> Refusal | None:
        """Would n records (nbytes) from `tenant` fit now? Refusal with Retry-After if not;
        never waits.

        n = 0 asks whether anything fits (the HTTP layer asks before reading a body). Until
        the intake's size has been observed once the bound is not enforced: an intake that
        cannot tell its size (the Kafka topic, for now) is not refused on a guess. `source`:
        the peer host (n > 0: it authenticated as `tenant`)."""
        large = n > self.limit_records
        if n > 0:  # a body counted: its sender was authenticated
            self._know(tenant, source)
        refusal = self._check(n, nbytes, tenant)
        if refusal is not None and not refusal.never and not large:
            self._note_refused(tenant, self._clock())
        return refusal

    def check_open(
        self, tenant: str, declared_bytes: int = 0, source: str = "", authenticated: bool = False
    ) -> Refusal | Let | None:
        """`check(0, 0, tenant)`, before a body is read, knowing its declared size. Refused
        there, a large sender would never reach its place in line: every request is refused
        before its body is read while the backlog is at its bound, and the one let through
        when it falls below is whoever re-sends first. So a body whose declared size is more
        records than the bound (at the bytes per record the intake holds; a compressed body
        is underestimated) is taken for a large body's: refused, its tenant takes or keeps a
        place in line (Retry-After: its turn); first in line with its turn come (or the line
        empty), it is let through (a `Let`: hand it back to `body_read`), and its body,
        counted, decides (the hold).

        This runs before the signature (over the body) can be checked, so nothing here acts
        on the line unless a request of `tenant` from the same peer host `source` has
        authenticated before (`authenticated`: it has now, an API key) and none from there
        has failed since (`body_read`): a client elsewhere that knows a tenant's name cannot
        give it a place, keep its place alive, take or spend its turn, nor have a body read.
        At the bound one body is read at a time this way (the others: 429, retry in 1 s), and
        the first in line let through that has no large body counted within
        LARGE_HOLD_GRACE s loses its place (it joins at the back if it sends again)."""
        refusal = self.check(0, 0, tenant)
        if refusal is None or declared_bytes <= 0 or self._observed_at is None:
            return refusal
        if authenticated:
            self._know(tenant, source)
        elif (tenant, source) not in self._known:
            return refusal
        limit, now = self.limit_records, self._clock()
        records = math.ceil(declared_bytes / self._record_bytes)
        hold = self._current_hold(now)
        if records <= limit or records > self.cfg.max_backlog_records:
            return refusal
        if hold is not None:
            if hold.tenant == tenant:
                return refusal
            return self._wait_turn(tenant, records, self.backlog_records, limit, now, False)
        self._prune_line(now)
        head = next(iter(self._line), None)
        if (head is None or head == tenant) and self._turn_wait(tenant, now) <= 0:
            entry = self._line.get(tenant)
            if entry is None:  # the line is empty: first in it, let through now
                self._line_seq += 1
                entry = self._line[tenant] = _InLine(self._line_seq, records, now, now)
                self._line_seen[tenant] = None
            if entry.let_through is None:
                entry.let_through = now
                # its body is being read (slowly, on a loaded host): its place waits for it
                entry.lapses = max(entry.lapses, now + _BODY_WAIT)
                entry.seen = now
                self._line_seen.move_to_end(tenant)
            if now - entry.let_through < LARGE_HOLD_GRACE:
                if self._reading is not None and now - self._reading.at > _READ_KEPT:
                    self._reading = None
                if self._reading is not None:
                    return Refusal(
                        f"{self._too_large(limit)}: it is this tenant's turn, and another "
                        "request of it is being read; one is read at a time: retry in 1 s",
                        1.0,
                    )
                self._tickets += 1
                self._reading = Let(tenant, source, self._tickets, now)
                return self._reading
            self._leave_line(tenant)  # let through, no large body of it counted: to the back
        return self._wait_turn(tenant, records, self.backlog_records, limit, now, False)

    def body_read(self, let: Let) -> None:
        """The body let through by `check_open` was read (or never came whole) and counted or
        refused: the next one may be read. Its tenant's turn runs on (LARGE_HOLD_GRACE s from
        its first let-through); a signature that failed takes its host's right to act on the
        line before authentication (`auth_failed`), so a client elsewhere never gets here."""
        if self._reading is not None and self._reading.ticket == let.ticket:
            self._reading = None

    def auth_failed(self, tenant: str, source: str) -> None:
        """A request naming `tenant` from host `source` failed authentication: nothing from
        there acts on the line for it before authentication until one authenticates again."""
        self._known.pop((tenant, source), None)

    def _know(self, tenant: str, source: str) -> None:
        key = (tenant, source)
        self._known[key] = None
        self._known.move_to_end(key)
        if len(self._known) > _KNOWN_KEPT:
            self._known.popitem(last=False)

    def _note_refused(self, tenant: str, now: float) -> None:
        """A request of `tenant` within the bound was refused now. Two slots, O(1) whatever
        the number of tenants (the check runs before a request is authenticated, so any client
        can name tenants): the newest refusal, and the newest of a tenant other than its."""
        if self._refused_last[0] != tenant:
            self._refused_other = self._refused_last
        self._refused_last = (tenant, now)

    def _others_refused(self, tenant: str, since: float) -> bool:
        """Was a request within the bound of a tenant other than `tenant` refused at or after
        `since`? (Large bodies refused wait in line: the line, not this, orders them.)"""
        last, other = self._refused_last, self._refused_other
        return (last if last[0] != tenant else other)[1] >= since

    def _check(self, n: int, nbytes: int, tenant: str) -> Refusal | None:
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
        now = self._clock()
        hold = self._current_hold(now)
        if hold is not None and n > 0:
            if tenant == hold.tenant and n > hold.limit:
                if not over_bytes and (records == 0 or not over_records):
                    self._end_hold(now, self._drain_seconds(n))  # its large body is taken
                    return None
                return self._wait_alone(records)
            if n > limit and tenant != hold.tenant:  # another large body: behind the holder
                return self._wait_turn(tenant, n, records, limit, now)
            return self._held(hold, now)
        if n > limit:
            return self._large(tenant, n, records, limit, bool(over_bytes), now)
        if n > 0 and not over_records and not over_bytes:
            return None
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

    # -- the hold of the door for a large body (rules: the module docstring) ------------------

    def _current_hold(self, now: float) -> Hold | None:
        hold = self._hold
        if hold is not None and now >= hold.until:  # its holder did not come back in time
            self._end_hold(hold.until, 0.0)
            return None
        return hold

    def _end_hold(self, at: float, drain: float) -> None:
        """The hold ends at `at`; `drain`: seconds the holder's body takes to drain (0: not
        taken). The door stays open for others as long as it was held, after that drain."""
        hold = self._hold
        assert hold is not None
        self._hold = None
        self._large_taken(hold.tenant, at, drain, hold.length)

    def _large_taken(self, tenant: str, at: float, drain: float, held: float) -> None:
        """A large body of `tenant` was taken at `at` (drain: its drain time; held: the hold it
        had, 0 if none) or its hold lapsed (drain 0). It had the door for drain + held: once it
        has drained, the others have the door as long (no large body of anyone is held for or
        taken over them), then as long again before its tenant's next one."""
        had = drain + held
        self._hold_free_at = max(self._hold_free_at, at + drain + had)
        self._hold_paused[tenant] = at + drain + 2 * had
        self._hold_paused = {t: u for t, u in self._hold_paused.items() if u > at}

    def _turn_wait(self, tenant: str, now: float) -> float:
        """Seconds until a large body of `tenant` may have the door (the others' turn after the
        last one, its tenant's own pause); <= 0 when it may now."""
        return max(self._hold_free_at, self._hold_paused.get(tenant, -math.inf)) - now

    def _large(
        self, tenant: str, n: int, records: int, limit: int, over_bytes: bool, now: float
    ) -> Refusal | None:
        """A body larger than the bound while no hold is in force: taken alone into an empty
        intake, or the door held for it, if it is first in line (or the line is empty) and
        the others have had their turn; else it waits in line (rules: the module docstring)."""
        self._prune_line(now)
        head = next(iter(self._line), None)
        first = head is None or head == tenant
        wait = self._turn_wait(tenant, now)
        if first and records == 0 and not over_bytes:
            # One body larger than the whole budget would be refused forever, its retries
            # included: it is taken once the intake is empty (one body of lag over budget);
            # in the others' turn only if no one else was refused since the last large body
            # had the door (a sender told to wait out a hold is still waiting).
            since = min(self._door_since, now - LARGE_HOLD_GRACE)
            if wait <= 0 or not self._others_refused(tenant, since):
                self._leave_line(tenant)
                self._door_since = now
                self._large_taken(tenant, now, self._drain_seconds(n), 0.0)
                return None
        elif first and wait <= 0:
            self._leave_line(tenant)
            return self._grant_hold(tenant, n, records, limit, now)
        return self._wait_turn(tenant, n, records, limit, now)

    def _wait_turn(
        self, tenant: str, n: int, records: int, limit: int, now: float, counted: bool = True
    ) -> Refusal:
        """A large body that may not have the door now: in line, or told to wait out its
        tenant's pause after its last large body (it takes a place in line after that).
        `counted`: its body was counted (not only its declared size, before it was read)."""
        paused = self._hold_paused.get(tenant, -math.inf) - now
        if paused > 0:
            return self._refuse_paused(limit, records, self._turn_wait(tenant, now))
        return self._in_line(tenant, n, records, limit, now, counted)

    def _grant_hold(self, tenant: str, n: int, records: int, limit: int, now: float) -> Refusal:
        retry_after = self._drain_seconds(records)
        self._hold = Hold(tenant, now, now + retry_after + LARGE_HOLD_GRACE, limit, n)
        self._door_since = now
        return Refusal(
            f"{self._too_large(limit)}: it is taken "
            f"alone, once the {records:,} records ahead of it are delivered (new requests "
            f"wait meanwhile, for at most {self._hold.length:.0f} s); retry in "
            f"{retry_after:.0f} s",
            retry_after,
        )

    def _too_large(self, limit: int) -> str:
        """The start of every refusal of a body larger than the bound."""
        return (
            f"this request is larger than the {limit:,} records the pipeline delivers "
            f"within the {self.cfg.lag_budget_seconds:g} s lag budget"
        )

    def _refuse_paused(self, limit: int, records: int, wait: float) -> Refusal:
        retry_after = self._seconds(wait)
        what = self._too_large(limit)
        if records == 0:
            return Refusal(
                f"{what}, and so was one taken just before: requests of others that are "
                f"waiting go first; retry in {retry_after:.0f} s",
                retry_after,
            )
        return Refusal(
            f"{what}: it is taken alone, once the intake is empty, and the door cannot be "
            "held for it before the traffic of others has had its turn; retry in "
            f"{retry_after:.0f} s",
            retry_after,
        )

    # -- the line of large senders: first refused, first served ---------------------------------

    def _in_line(
        self, tenant: str, n: int, records: int, limit: int, now: float, counted: bool = True
    ) -> Refusal:
        """Refuse a large body that is not first in line (or whose turn has not come), keeping
        or giving its tenant a place; Retry-After: about when its turn comes."""
        self._prune_line(now)
        line = self._line
        what = self._too_large(limit)
        entry = line.get(tenant)
        if entry is None:
            if len(line) >= _QUEUE_KEPT:
                retry_after = float(self.cfg.max_retry_after_seconds)
                return Refusal(
                    f"{what}, and {len(line):,} such requests are waiting in line for their "
                    f"turn, the most the door keeps: retry in {retry_after:.0f} s",
                    retry_after,
                )
            self._line_seq += 1
            entry = line[tenant] = _InLine(self._line_seq, n, now, now)
        self._line_seen[tenant] = None
        self._line_seen.move_to_end(tenant)
        entry.records, entry.seen = n, now
        if counted:
            entry.let_through = None
        ahead = entry.seq - next(iter(line.values())).seq  # at most: some may have lapsed
        wait = self._head_wait(now) + ahead * self._turn_length(n, limit)
        retry_after = self._seconds(wait)
        entry.lapses = now + retry_after + LARGE_HOLD_GRACE
        others = "others that are waiting go first; " if records == 0 else ""
        return Refusal(
            f"{what}: it is taken alone, in turn with other such requests in the order they "
            f"were first refused (it is number {ahead + 1} in line; it keeps its place if it "
            f"is sent again within {LARGE_HOLD_GRACE:.0f} s of its Retry-After); {others}"
            f"retry in {retry_after:.0f} s",
            retry_after,
        )

    def _prune_line(self, now: float) -> None:
        """Drop the senders who stopped re-sending: the first in line once past its lapse, and
        anyone silent longer than any lapse (oldest first). O(1) a request, amortized."""
        line, seen = self._line, self._line_seen
        stale = now - max(self.cfg.max_retry_after_seconds + LARGE_HOLD_GRACE, _BODY_WAIT)
        while seen:
            tenant = next(iter(seen))
            if line[tenant].seen > stale:
                break
            del seen[tenant], line[tenant]
        while line:
            tenant, entry = next(iter(line.items()))
            reading = self._reading is not None and self._reading.tenant == tenant
            turn_over = (
                entry.let_through is not None
                and now - entry.let_through >= LARGE_HOLD_GRACE
                and not reading
            )
            if entry.lapses > now and not turn_over:
                break
            del line[tenant], seen[tenant]

    def _leave_line(self, tenant: str) -> None:
        if self._line.pop(tenant, None) is not None:
            del self._line_seen[tenant]

    def _head_wait(self, now: float) -> float:
        """Seconds until the first in line may have the door: the hold in force, its body's
        drain and the others' turn after it (estimated), or the others' turn now."""
        hold = self._hold
        if hold is None:
            return max(0.0, self._hold_free_at - now)
        taken = min(hold.until, now + self._eta(self.backlog_records))
        drain = self._eta(hold.records) if taken < hold.until else 0.0
        return max(self._hold_free_at, taken + 2 * drain + hold.length) - now

    def _turn_length(self, n: int, limit: int) -> float:
        """About how long one large body of n records ahead in line has the door: its hold while
        the backlog ahead (about the bound) drains, its own drain, the others' turn after."""
        ahead = min(float(self.cfg.max_retry_after_seconds), self._eta(limit))
        return 2 * (ahead + self._eta(n)) + LARGE_HOLD_GRACE

    def _eta(self, records: int) -> float:
        """Seconds the pipeline takes to drain `records` at the measured rate (0: unknown)."""
        if self._rate is None:
            return 0.0
        if self._rate <= 0:
            return float(self.cfg.max_retry_after_seconds)
        return records / self._rate

    def _wait_alone(self, records: int) -> Refusal:
        """The holder's large body, back before the backlog ahead of it drained."""
        retry_after = self._drain_seconds(records)
        return Refusal(
            f"this request is taken alone, once the {records:,} records ahead of it are "
            f"delivered; the door is held for it meanwhile; retry in {retry_after:.0f} s",
            retry_after,
        )

    def _held(self, hold: Hold, now: float) -> Refusal:
        retry_after = self._seconds(hold.until - now)
        return Refusal(
            "the intake is emptying for a request larger than the lag budget, which is "
            f"taken alone; retry in {retry_after:.0f} s",
            retry_after,
        )

    def _seconds(self, wait: float) -> float:
        return float(min(self.cfg.max_retry_after_seconds, max(1.0, math.ceil(wait))))

    @property
    def held(self) -> bool:
        """A refused large body holds the door (others are refused until it is taken)."""
        return self._current_hold(self._clock()) is not None

    @property
    def hold(self) -> Hold | None:
        """The hold in force, if any."""
        return self._current_hold(self._clock())

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
        now = self._clock()
        hold = self._current_hold(now)
        self._prune_line(now)
        return {
            "records": self.backlog_records,
            "bytes": self.backlog_bytes,
            "seconds": None if seconds is None else round(seconds, 1),
            "limit_records": self.limit_records,
            "limit_bytes": self.cfg.max_backlog_bytes,
            "lag_budget_seconds": self.cfg.lag_budget_seconds,
            "drain_rate": None if self._rate is None else round(self._rate, 1),
            "refused_requests": self.refused,
            "held_for_large_request": hold is not None,
            "hold": None
            if hold is None
            else {
                "tenant": hold.tenant,
                "seconds_left": round(hold.until - now, 1),
                "length_seconds": round(hold.length, 1),
            },
            "hold_free_in_seconds": round(max(0.0, self._hold_free_at - now), 1),
            "hold_paused": {
                t: round(u - now, 1) for t, u in sorted(self._hold_paused.items()) if u > now
            },
            "hold_queue_length": len(self._line),
            "hold_queue": list(islice(self._line, _QUEUE_SHOWN)),
        }
