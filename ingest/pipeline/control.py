"""This process follows the fleet's control record (`ingest.state.control`).

Every process that runs a pipeline (each pod, each worker process of a pod) runs one
`ControlFollower`: it applies the record to its own `Admission` when the record's version
changes, learning of changes by notification (Postgres LISTEN) and, as the fallback that
always runs, by reading the record every `poll_seconds`. `/admin/*` goes through `submit`,
which writes the record (compare-and-set) and applies it here at once.

What a store outage does: nothing to the state. A read that fails keeps the applied state,
and health says since when the record could not be read; an `/admin/*` write that fails is
refused (503) rather than applied to this pod alone, which would split the fleet.

A pod's own SIGTERM drain is local and never written to the record; `freeze()` stops the
follower first, so no fleet `resume` can undo a shutdown in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from ingest.errors import StoreUnavailable
from ingest.metrics import Metrics
from ingest.pipeline.admission import Admission
from ingest.state.control import ControlRecord, ControlRecordMissing, ControlStore, transition
from ingest.state.control import update as cas_update
from ingest.timefmt import iso

log = logging.getLogger(__name__)
LISTEN_RETRY_SECONDS = 5.0


class ControlFollower:
    def __init__(
        self,
        store: ControlStore,
        admission: Admission,
        *,
        poll_seconds: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.admission = admission
        self.poll_seconds = poll_seconds
        self._wall = wall_clock
        self.desired: ControlRecord | None = None  # last record read or written
        self.applied = ControlRecord()  # what this process's admission follows
        self.applied_at: float | None = None
        self.last_read_at: float | None = None
        self.error: str | None = None
        self.error_since: float | None = None
        self._lock = asyncio.Lock()  # a read and a write never apply out of order here
        self._wake = asyncio.Event()
        self._frozen = False
        self._next_listen = 0.0

    # -- following -----------------------------------------------------------------------

    async def sync(self) -> ControlRecord | None:
        """Read the record and apply it if its version differs; on failure keep the state."""
        async with self._lock:
            try:
                rec = await self.store.read()
            except (StoreUnavailable, ControlRecordMissing) as exc:
                self._failed(str(exc))
                return None
            except Exception as exc:  # a driver's odd error mid-outage: same answer, never die
                self._failed(f"{type(exc).__name__}: {exc}")
                return None
            self._read_ok(rec)
            self._apply(rec)
            return rec

    def _read_ok(self, rec: ControlRecord) -> None:
        if self.error is not None:
            log.warning("fleet control: record readable again (version %d)", rec.version)
        self.error = self.error_since = None
        self.desired = rec
        self.last_read_at = self._wall()

    def _failed(self, why: str) -> None:
        if self.error is None:
            log.error(
                "fleet control: cannot read the control record (%s); keeping %s",
                why,
                self.applied.state,
            )
            self.error_since = self._wall()
        self.error = why

    def _apply(self, rec: ControlRecord) -> None:
        """Move admission from the applied record's switches to `rec`'s, by its own methods."""
        if self._frozen or rec.version == self.applied.version:
            return
        prev, adm = self.applied, self.admission
        if (
            (prev.paused and not rec.paused)
            or (prev.draining and not rec.draining)
            or (prev.brownout_rate is not None and rec.brownout_rate is None)
        ):
            adm.resume()  # a switch went off: start clean, then set what stays on
            prev = ControlRecord()
        if rec.draining and not prev.draining:
            adm.drain()
        if rec.paused and not prev.paused:
            adm.pause()
        if rec.brownout_rate is not None and rec.brownout_rate != prev.brownout_rate:
            adm.brownout(rec.brownout_rate)
        log.warning(
            "fleet control: applied version %d (%s by %s): %s",
            rec.version,
            rec.action,
            rec.updated_by,
            rec.state,
        )
        self.applied, self.applied_at = rec, self._wall()

    def notify(self) -> None:
        """A change notification arrived: read now rather than at the next poll."""
        self._wake.set()

    async def _ensure_listening(self) -> None:
        if self.store.listening or time.monotonic() < self._next_listen:
            return
        self._next_listen = time.monotonic() + LISTEN_RETRY_SECONDS
        try:
            if await self.store.listen(self.notify):
                log.info(
                    "fleet control: listening for changes (polling every %gs too)",
                    self.poll_seconds,
                )
        except StoreUnavailable as exc:
            log.warning(
                "fleet control: no notifications (%s); polling every %gs", exc, self.poll_seconds
            )

    async def run(self, stopping: asyncio.Event) -> None:
        """Follow until `stopping` is set: a read per notification, and one per poll."""
        while not stopping.is_set() and not self._frozen:
            await self._ensure_listening()
            await self.sync()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                waiters = [
                    asyncio.ensure_future(self._wake.wait()),
                    asyncio.ensure_future(stopping.wait()),
                ]
                try:
                    await asyncio.wait(
                        waiters, timeout=self.poll_seconds, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for w in waiters:
                        w.cancel()

    def freeze(self) -> None:
        """Stop applying anything (shutdown): the pod's own drain must stand."""
        self._frozen = True
        self._wake.set()

    # -- operator actions ----------------------------------------------------------------

    async def submit(self, action: str, *, rate: float | None, who: str) -> ControlRecord:
        """Write the action into the fleet's record and apply it here at once.

        Raises StoreUnavailable (nothing changed anywhere) or ValueError (bad rate/action).
        """
        async with self._lock:
            try:
                rec = await cas_update(
                    self.store,
                    lambda cur: transition(cur, action, rate=rate, who=who, now=self._wall()),
                )
            except ControlRecordMissing as exc:
                raise StoreUnavailable(self.store.kind, "fleet_control", str(exc)) from exc
            self._read_ok(rec)
            self._apply(rec)
            return rec

    # -- health --------------------------------------------------------------------------

    def export(self, metrics: Metrics) -> None:
        """`ingest_control_version{view}` and `ingest_control_readable`."""
        desired = None if self.desired is None else self.desired.version
        metrics.set_control(desired, self.applied.version, self.error is None)

    def snapshot(self) -> dict[str, Any]:
        """For /health/detailed `.control`: the fleet's desired state vs this pod's."""
        d, a = self.desired, self.applied
        return {
            "store": self.store.kind,
            "notifications": "listening" if self.store.listening else "none (polling)",
            "poll_seconds": self.poll_seconds,
            "desired": None if d is None else _record(d),
            "applied": {
                "state": a.state,
                "version": a.version,
                "brownout_rate": a.brownout_rate,
                "applied_at": iso(self.applied_at),
                # written -> applied here, exactly (wall clocks of two pods may differ a bit)
                "after_seconds": None
                if self.applied_at is None or a.version == 0
                else round(max(0.0, self.applied_at - a.updated_at), 4),
            },
            "in_sync": d is not None and d.version == a.version,
            "last_read_at": iso(self.last_read_at),
            "error": None
            if self.error is None
            else f"control record unreadable since {iso(self.error_since)} ({self.error}); "
            f"this pod keeps its applied state ({a.state})",
        }


def _record(r: ControlRecord) -> dict[str, Any]:
    return {
        "state": r.state,
        "paused": r.paused,
        "draining": r.draining,
        "brownout_rate": r.brownout_rate,
        "version": r.version,
        "action": r.action,
        "updated_by": r.updated_by,
        "updated_at": iso(r.updated_at),
    }


def rate_limit_status(limiter: object) -> dict[str, Any]:
    """`.rate_limits` of /health/detailed: fleet-wide (GCRA in Redis) or per process."""
    status = getattr(limiter, "status", None)
    if status is not None:
        out: dict[str, Any] = status()
        return out
    return {"backend": "local-token-bucket", "fleet_wide": False, "error": None}


def add_to_health(doc: dict[str, Any], follower: ControlFollower, limiter: object) -> None:
    """Put `.control` and `.rate_limits` into a /health/detailed document; a control record
    that cannot be read, or limits no longer fleet-wide, make a `degraded` problem."""
    doc["control"] = control = follower.snapshot()
    doc["rate_limits"] = limits = rate_limit_status(limiter)
    found = [("fleet_control", control["error"]), ("rate_limits", limits.get("error"))]
    for component, message in found:
        if message is None:
            continue
        doc.setdefault("problems", []).append(
            {"component": component, "severity": "degraded", "message": str(message)}
        )
        if doc.get("status") == "ok":
            doc["status"] = "degraded"
