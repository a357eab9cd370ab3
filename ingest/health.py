"""Health that tells the truth: liveness, readiness and the detailed view, from every part.

    /health/live      200 while the event loop turns: a heartbeat task stamps the time every
                      quarter second; older than `health.live_timeout_seconds` -> 503.
    /health/ready     200 {"ready": true} when this pod should get traffic; 503
                      {"ready": false, "reasons": [...]} while starting, draining, paused, or
                      unhealthy itself (event loop stuck, its disk full or below the low
                      watermark, its embedded state store failing). A shared store or a sink
                      down is `unhealthy` in /health/detailed but not a reason to send
                      webhooks elsewhere: every pod shares it, and the intake still works.
    /health/detailed  everything, with a top-level `status` computed from the parts and the
                      `problems` behind it: never `ok` while a part is failing.

Status: `unhealthy` when nothing can be made durable (a state store down, writes waiting for
disk space, every sink unreachable, the event loop stuck); `degraded` when a part is failing
but work still moves elsewhere (one sink unreachable, by its active probe, or its breaker not
closed; a source stalled, restarting, erroring or lagging past the SLO; free space below the
low watermark; backpressure not `normal`); else `ok`.

Sources are judged by `SourceProgress.judge` (stall detection). A source reporting `error`
has lag of at least the time since it last was not in error: an S3 listing that fails does
not know what waits, which is not the same as nothing waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ingest.config import HealthConfig
from ingest.disk import DiskGuard
from ingest.metrics import Metrics
from ingest.pipeline.admission import Admission, BackpressureState
from ingest.pipeline.breaker import BreakerState
from ingest.pipeline.progress import SourceProgress
from ingest.sources.base import AdapterHealth, Source

if TYPE_CHECKING:
    from ingest.pipeline.worker import Pipeline, SinkLane

PROBE_TIMEOUT = 2.0
# Parts of this pod itself: when they fail, traffic is better sent to another pod. A shared
# store or a sink that is down fails every pod alike; this one's intake still takes webhooks
# durably, so it stays ready (and says `unhealthy` in /health/detailed).
_LOCAL = ("event_loop", "disk", "store:state")
_HELD = (BackpressureState.DRAIN, BackpressureState.PAUSED)


@dataclass(slots=True)
class Problem:
    component: str  # "sink:postgres", "source:s3-main", "store:redis", "disk", ...
    severity: str  # "degraded" | "unhealthy"
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"component": self.component, "severity": self.severity, "message": self.message}


@dataclass(slots=True)
class _SourceView:
    health_id: int = 0  # id() of the AdapterHealth last seen (a rebuilt source has a new one)
    errors_seen: int = 0
    last_ok: float = 0.0
    lag: float = 0.0
    stalled: bool = False


@dataclass
class HealthMonitor:
    cfg: HealthConfig
    metrics: Metrics
    admission: Admission
    pipeline: Pipeline
    lanes: Mapping[str, SinkLane]
    probe_stores: Callable[[], Awaitable[dict[str, Any]]]
    sources: Callable[[], Sequence[Source]]
    progress: Mapping[str, SourceProgress]
    queue_depth: Callable[[], int]
    disk: DiskGuard | None = None
    info: dict[str, Any] = field(default_factory=dict)  # mode, worker: shown as they are
    clock: Callable[[], float] = time.time
    started: bool = False  # set once sources run: not ready before
    _beat: float = field(default_factory=time.monotonic)
    _loop_lag: float = 0.0
    _sinks: dict[str, dict[str, Any]] = field(default_factory=dict)
    _stores: dict[str, Any] = field(default_factory=dict)
    _probed_at: float = 0.0
    _probe_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _views: dict[str, _SourceView] = field(default_factory=dict)
    _started_at: float = field(default_factory=time.time)

    # ------------------------------------------------------------------ background loop
    async def run(self, stopping: asyncio.Event) -> None:
        """Heartbeat every 0.25 s; sources and disk every second; probes every probe_seconds."""
        beat = 0.25
        next_observe = 0.0
        while not stopping.is_set():
            now = time.monotonic()
            self._loop_lag = max(0.0, now - self._beat - beat) if self._beat else 0.0
            self._beat = now
            if now >= next_observe:
                next_observe = now + 1.0
                self.observe()
            if self.clock() - self._probed_at >= self.cfg.probe_seconds:
                with contextlib.suppress(Exception):
                    await self.probe()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), beat)

    async def probe(self) -> None:
        """Ask every sink and the state stores now, concurrently, each within 2 s."""
        async with self._probe_lock:
            names = list(self.lanes)
            sink_answers, stores = await asyncio.gather(
                asyncio.gather(*(self._probe_sink(n) for n in names)), self._probe_store()
            )
            self._sinks = dict(zip(names, sink_answers, strict=True))
            self._stores = stores
            self._probed_at = self.clock()
            for name, answer in self._sinks.items():
                self.metrics.sink_up.labels(name).set(1 if _connected(answer) else 0)

    async def _probe_sink(self, name: str) -> dict[str, Any]:
        try:
            answer = await asyncio.wait_for(self.lanes[name].sink.health(), PROBE_TIMEOUT)
        except Exception as exc:
            return {"connected": False, "error": str(exc) or type(exc).__name__}
        return dict(answer)

    async def _probe_store(self) -> dict[str, Any]:
        try:
            return dict(await asyncio.wait_for(self.probe_stores(), PROBE_TIMEOUT))
        except Exception as exc:
            return {"ok": False, "error": str(exc) or type(exc).__name__}

    def observe(self) -> None:
        """Per source: errors into the metric, lag (corrected while erroring), stall."""
        now = self.clock()
        held = self.admission.state in _HELD
        for source in self.sources():
            h = source.health()
            view = self._views.setdefault(source.name, _SourceView(last_ok=now))
            if view.health_id != id(h):  # a rebuilt source starts counting again
                view.health_id, view.errors_seen = id(h), 0
            if h.error_count > view.errors_seen:
                self.metrics.source_errors.labels(source.name).inc(h.error_count - view.errors_seen)
                view.errors_seen = h.error_count
            erroring = h.status == "error"
            if not erroring:
                view.last_ok = now
            view.lag = _lag(h, view, now)
            progress = self.progress.get(source.name)
            view.stalled = progress is not None and progress.judge(
                has_work=view.lag > 0 or erroring,
                held=held,
                stall_after=self.cfg.stall_after_seconds,
            )
            self.metrics.adapter_lag.labels(source.name).set(view.lag)
            self.metrics.source_stalled.labels(source.name).set(1 if view.stalled else 0)
        if self.disk is not None:
            self.disk.sample()

    # ------------------------------------------------------------------ the three views
    def live(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self._beat
        ok = age < self.cfg.live_timeout_seconds
        return ok, {
            "status": "ok" if ok else "stuck",
            "heartbeat_age_seconds": round(age, 3),
            "loop_lag_seconds": round(self._loop_lag, 3),
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        reasons: list[str] = []
        if not self.started:
            reasons.append("starting")
        state = self.admission.state
        if state is BackpressureState.DRAIN:
            reasons.append("draining")
        elif state is BackpressureState.PAUSED:
            reasons.append("paused")
        status, problems = self.assess()
        reasons += [
            f"{p.severity}: {p.component}: {p.message}"
            for p in problems
            if p.component.startswith(_LOCAL)
            and (p.severity == "unhealthy" or p.component == "disk")
        ]
        return not reasons, {"ready": not reasons, "status": status, "reasons": reasons}

    async def detailed(self) -> dict[str, Any]:
        await self.probe()
        self.observe()
        now = self.clock()
        adapters: dict[str, Any] = {}
        for source in self.sources():
            h = source.health()
            view = self._views.get(source.name, _SourceView())
            progress = self.progress.get(source.name)
            entry: dict[str, Any] = {"kind": source.kind, **h.as_dict()}
            # from this same reading of the source: its per-partition lags (extra) agree
            entry["lag_seconds"] = round(_lag(h, view, now), 3)
            entry["stalled"] = view.stalled
            if progress is not None:
                entry["stalled_since"] = progress.stalled_since
                entry["progress"] = progress.as_dict()
                if progress.restarting:
                    entry["status"] = "restarting"
            if view.stalled and entry["status"] != "restarting":
                entry["status"] = "stalled"
            adapters[source.name] = entry
        sinks: dict[str, Any] = {}
        for name, lane in self.lanes.items():
            snap = lane.breaker.snapshot()
            sinks[name] = {
                "kind": lane.sink.kind,
                "state": snap["state"],
                "breaker": snap,
                "connection": self._sinks.get(name, {}),
            }
        backpressure = self.admission.snapshot()
        backpressure["queue_depth"] = self.queue_depth()
        stores = self._stores_view()
        status, problems = self.assess()
        ready, _ = self.ready()
        return {
            "status": status,
            **self.info,
            "uptime_seconds": round(now - self._started_at, 1),
            "ready": ready,
            "problems": [p.as_dict() for p in problems],
            "adapters": adapters,
            "backpressure": backpressure,
            "sinks": sinks,
            "stores": stores,
            "store_errors": list(self.pipeline.store_errors),
            "disk": self._disk_view(),
        }

    # ------------------------------------------------------------------ judging
    def assess(self) -> tuple[str, list[Problem]]:
        """(status, problems) from the last probes and observations."""
        problems: list[Problem] = []

        def bad(component: str, message: str, severity: str = "degraded") -> None:
            problems.append(Problem(component, severity, message))

        live, body = self.live()
        if not live:
            bad("event_loop", f"no heartbeat for {body['heartbeat_age_seconds']}s", "unhealthy")
        for name, store in self._stores_view().items():
            if not _store_ok(store):
                bad(f"store:{name}", str(store.get("error", "unreachable")), "unhealthy")
        if self.pipeline.disk_full_since is not None:
            waited = self.clock() - self.pipeline.disk_full_since
            bad(
                "disk",
                f"writes waiting {waited:.0f}s for space: {self.pipeline.disk_full_error}",
                "unhealthy",
            )
        if self.disk is not None:
            snap = self.disk.snapshot()
            if snap["intake_refused"]:
                bad(
                    "disk",
                    f"{snap['free_bytes']} bytes free, below the low watermark "
                    f"{snap['low_watermark_bytes']}: webhook intake refused",
                )
        failing_sinks = 0
        for name, lane in self.lanes.items():
            answer = self._sinks.get(name)
            state = lane.breaker.state
            if answer is not None and not _connected(answer):
                failing_sinks += 1
                bad(f"sink:{name}", f"unreachable: {answer.get('error', 'probe failed')}")
            elif state is not BreakerState.CLOSED:
                failing_sinks += 1
                bad(f"sink:{name}", f"circuit breaker {state.value}")
        if self.lanes and failing_sinks == len(self.lanes):
            bad("sinks", "no sink is reachable", "unhealthy")
        for source in self.sources():
            h = source.health()
            view = self._views.get(source.name)
            progress = self.progress.get(source.name)
            comp = f"source:{source.name}"
            if progress is not None and progress.restarting:
                bad(comp, f"restarting after: {progress.last_restart_error}")
            if view is not None and view.stalled:
                bad(
                    comp,
                    f"stalled: pending work has not moved for {self.cfg.stall_after_seconds:.0f}s",
                )
            if h.status == "error":
                bad(comp, h.problem or (h.errors[0] if h.errors else "error"))
            if view is not None and view.lag > self.cfg.lag_slo_seconds:
                bad(comp, f"lag {view.lag:.0f}s above the {self.cfg.lag_slo_seconds:.0f}s SLO")
        pressure = self.admission.state
        if pressure is not BackpressureState.NORMAL:
            bad("backpressure", f"state {pressure.value}")
        if any(p.severity == "unhealthy" for p in problems):
            return "unhealthy", problems
        return ("degraded" if problems else "ok"), problems

    def _stores_view(self) -> dict[str, Any]:
        """The last store probe, with a full disk shown on the embedded state store (its
        reads still answer, its writes cannot). A DLQ store's row count is named for what it
        counts: `dlq_entries` (the stores answer `entries`)."""
        stores = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._stores.items()}
        if "error" in stores and not isinstance(stores.get("error"), dict):
            return {"all": stores}
        for view in stores.values():
            if isinstance(view, dict) and "entries" in view:
                view["dlq_entries"] = view.pop("entries")
        full = self.pipeline.disk_full_since is not None
        if full and isinstance(stores.get("state"), dict):
            stores["state"].update(ok=False, error=self.pipeline.disk_full_error)
        return stores

    def _disk_view(self) -> dict[str, Any] | None:
        view = self.disk.snapshot() if self.disk is not None else {}
        view["full"] = self.pipeline.disk_full_since is not None
        view["full_since"] = self.pipeline.disk_full_since
        view["last_error"] = self.pipeline.disk_full_error
        return view


def _connected(answer: Mapping[str, Any]) -> bool:
    return answer.get("connected", True) is not False and answer.get("ok", True) is not False


def _store_ok(store: Any) -> bool:
    return isinstance(store, Mapping) and _connected(store) and "error" not in store


def _lag(h: AdapterHealth, view: _SourceView, now: float) -> float:
    """A source's lag: its own figure, or while it errors, the time since it was last ok."""
    return max(h.lag_seconds, now - view.last_ok if h.status == "error" else 0.0)
