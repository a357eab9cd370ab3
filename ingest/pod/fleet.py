"""A pod's link to the fleet: the control record, fleet-wide tenant limits, replay metrics.

In a pod the control plane, not each worker, follows the fleet's control record: it applies
it to the pod's own `Admission`, whose modes it already hands every worker (`Admission.control`
over `ingest.pod.ipc`), so workers follow the fleet through the one channel that steers them.
Webhooks are admitted here too, so the fleet-wide limiter sits on this admission (workers'
pull sources take theirs from their own, built by the factory). Replay metrics are exported
here once rather than by each worker, whose counters the pod's /metrics would add up.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ingest import config as C
from ingest.factory import FleetState, open_fleet_state
from ingest.metrics import Metrics
from ingest.pipeline.admission import Admission
from ingest.pipeline.control import ControlFollower, add_to_health
from ingest.replay.metrics import ReplayCollector, replay_metrics
from ingest.replay.plans import plan_store


class PodFleet:
    def __init__(self, cfg: C.Config, admission: Admission, metrics: Metrics) -> None:
        self.cfg = cfg
        self.admission = admission
        self.metrics = metrics
        self._state: FleetState | None = None
        self._follower: ControlFollower | None = None
        self._stop = asyncio.Event()
        self.replays = ReplayCollector()

    @property
    def control(self) -> ControlFollower:
        assert self._follower is not None, "PodFleet.start() opens the control record"
        return self._follower

    async def start(self, registry: Any) -> list[asyncio.Task[None]]:
        """Open the shared state, apply the fleet's record before any worker starts, and
        return the tasks that follow it and export replays (on `registry`)."""
        self._state = state = await open_fleet_state(self.cfg)
        if state.limiter is not None:
            self.admission.limiter = state.limiter
        self._follower = ControlFollower(
            state.control, self.admission, poll_seconds=self.cfg.fleet.control_poll_seconds
        )
        await self._follower.sync()
        registry.register(self.replays)
        return [
            asyncio.create_task(self._follower.run(self._stop), name="fleet-control"),
            asyncio.create_task(
                replay_metrics(self.replays, plan_store(state), self._stop), name="replay-metrics"
            ),
        ]

    def add_to_health(self, doc: dict[str, Any]) -> None:
        if self._follower is not None:
            add_to_health(doc, self._follower, self.admission.limiter)

    def export(self) -> None:
        if self._follower is not None:
            self._follower.export(self.metrics)

    def freeze(self) -> None:
        """Shutdown: the pod's own drain must stand; stop following."""
        if self._follower is not None:
            self._follower.freeze()
        self._stop.set()

    async def close(self) -> None:
        if self._state is not None:
            await self._state.close()
