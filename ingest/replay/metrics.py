"""Replay metrics, exported by the service from the plan store.

Replays run in `replayctl run` (a laptop, a Kubernetes Job), a short-lived process Prometheus
cannot scrape and a pushgateway would remember wrongly after it dies. The runner already
writes each plan's progress into the plan store after every batch, so the service's
`/metrics` reads the plans from there (at most every `REFRESH_SECONDS`) and exports them:
a replay anywhere on the shared store shows on every pod's `/metrics`, and a replay whose
process was killed shows as not moving. Every pod exports the same series, so rules
aggregate with `max by (tenant, plan)`.

    ingest_replay_records_total{tenant,plan,outcome}  delivered | duplicate | dlq
    ingest_replay_progress_ratio{tenant,plan}         0..1 (absent when the size is unknown)
    ingest_replay_duration_seconds{tenant,plan}       first start -> finish, or now
    ingest_replay_eta_seconds{tenant,plan}            projected seconds left (+Inf: not moving)
    ingest_replay_rto_seconds{tenant,plan}            the plan's recovery time objective
    ingest_replay_estimate_records{tenant,plan}       the plan's size, when known
    ingest_replay_state{tenant,plan,state}            1 for the plan's state

Exported plans: every started plan not completed, and completed ones for a day after (so the
final duration stays visible); labels stay bounded by the plans of that window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest.replay import plans as P

log = logging.getLogger(__name__)
REFRESH_SECONDS = 5.0
COMPLETED_VISIBLE_SECONDS = 86_400.0
OUTCOMES = ("delivered", "duplicate", "dlq")


def visible(plan: P.Plan, now: float) -> bool:
    if plan.started_at is None:
        return False
    if plan.state == P.COMPLETED:
        return (plan.finished_at or 0.0) >= now - COMPLETED_VISIBLE_SECONDS
    return True


class ReplayCollector(Collector):
    """A prometheus_client collector over the plans last read from the plan store."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._plans: list[P.Plan] = []
        self._read_at = -float("inf")
        self.error: str | None = None

    async def refresh(self, store: P.PlanStore, timeout: float = 2.0) -> None:
        """Read the plans unless read within REFRESH_SECONDS; on failure keep the last ones."""
        now = self._clock()
        if now - self._read_at < REFRESH_SECONDS:
            return
        self._read_at = now
        try:
            plans = await asyncio.wait_for(store.list(None), timeout)
        except Exception as exc:  # a scrape must not fail because the plan store did
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("replay metrics: cannot read the plan store (%s)", self.error)
            return
        self.error = None
        self._plans = [p for p in plans if visible(p, now)]

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        labels = ["tenant", "plan"]
        records = CounterMetricFamily(
            "ingest_replay_records",
            "Records a replay delivered, by outcome.",
            labels=[*labels, "outcome"],
        )
        ratio = GaugeMetricFamily(
            "ingest_replay_progress_ratio", "Share of the replay done (0..1).", labels=labels
        )
        duration = GaugeMetricFamily(
            "ingest_replay_duration_seconds",
            "Wall time since the replay first started (until it finished).",
            labels=labels,
        )
        eta = GaugeMetricFamily(
            "ingest_replay_eta_seconds",
            "Projected seconds until the replay finishes (+Inf while nothing moves it).",
            labels=labels,
        )
        rto = GaugeMetricFamily(
            "ingest_replay_rto_seconds", "The replay's recovery time objective.", labels=labels
        )
        estimate = GaugeMetricFamily(
            "ingest_replay_estimate_records", "Records the replay was estimated at.", labels=labels
        )
        state = GaugeMetricFamily(
            "ingest_replay_state", "1 for the replay's current state.", labels=[*labels, "state"]
        )
        for plan in self._plans:
            key = [plan.tenant, plan.id]
            view = P.progress_view(plan, now)
            done = {"delivered": 0, "duplicate": 0, "dlq": 0}
            for prog in plan.progress.values():
                done["delivered"] += prog.delivered
                done["duplicate"] += prog.duplicate
                done["dlq"] += prog.dlq
            for outcome in OUTCOMES:
                records.add_metric([*key, outcome], done[outcome])
            state.add_metric([*key, plan.state], 1)
            if view.ratio is not None:
                ratio.add_metric(key, view.ratio)
            if view.duration_seconds is not None:
                duration.add_metric(key, view.duration_seconds)
            if view.eta_seconds is not None:
                eta.add_metric(key, view.eta_seconds)
            if view.rto_seconds is not None:
                rto.add_metric(key, view.rto_seconds)
            if view.estimate_records is not None:
                estimate.add_metric(key, view.estimate_records)
        yield from (records, ratio, duration, eta, rto, estimate, state)


async def replay_metrics(
    collector: ReplayCollector, plans: P.PlanStore, stopping: asyncio.Event
) -> None:
    """Keep `collector` fresh from the plan store until `stopping` (the service's or the pod
    control plane's task)."""
    while not stopping.is_set():
        await collector.refresh(plans)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), REFRESH_SECONDS)
