"""Runs the service: start, supervise each source's runner, tick, health, drain, serve HTTP.

What runs is built by `ingest.factory` (stores, sinks, sources, the delivery Core); this
module only runs it. The HTTP layer sees it through `ingest.api.app.ServiceHost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from ingest import config as C
from ingest.factory import Core, SourceSet, build_core, build_sources, worker_id
from ingest.pipeline.admission import BackpressureState
from ingest.pipeline.breaker import BreakerState
from ingest.pipeline.runner import SourceRunner

log = logging.getLogger(__name__)


def tune_gc() -> None:
    """Fewer, cheaper collections: records in flight are acyclic, and CPython's default
    generation-0 threshold (700) makes the collector walk every in-flight batch again and
    again (measured: 2-4x throughput on the S3 path). Start-up objects are frozen so full
    collections skip them."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


# ---------------------------------------------------------------------- the service
class Service:
    """One running worker: its sources' runners under supervision, the admission tick, health,
    and the drain on shutdown. Satisfies `ingest.api.app.ServiceHost`."""

    def __init__(self, core: Core, sources: SourceSet) -> None:
        self.core = core
        self.config = core.config
        self.stores = core.stores
        self.sources = sources.sources
        self.intake = sources.intake
        self._webhook = sources.webhook
        self.lanes = core.lanes
        self.metrics = core.metrics
        self.admission = core.admission
        self.decoder = core.decoder
        self.pipeline = core.pipeline
        self.stopping = asyncio.Event()
        self.started_at = time.time()
        self._pending = 0
        self._intake_backlog = 0
        self._intake_committed = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.worker = worker_id()

    @classmethod
    async def build(cls, cfg: C.Config) -> Service:
        core = await build_core(cfg)
        return cls(core, await build_sources(cfg, core.stores))

    def notify_webhook(self) -> None:
        if self._webhook is not None:
            self._webhook.notify()

    def _on_pending(self, delta: int) -> None:
        self._pending += delta

    async def start(self) -> None:
        await self.core.start_sinks()
        for source in self.sources:
            await source.start()
        for source in self.sources:
            runner = SourceRunner(
                source,
                self.pipeline,
                self.decoder,
                self.admission,
                stopping=self.stopping,
                on_pending=self._on_pending,
            )
            self._tasks.append(asyncio.create_task(self._supervise(runner), name=source.name))
        self._tasks.append(asyncio.create_task(self._tick(), name="tick"))

    async def _supervise(self, runner: SourceRunner) -> None:
        """Restart a source's runner after an unexpected error, with backoff; never exit."""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                await runner.run()
                return
            except Exception as exc:
                log.exception("source %s stopped; restarting in %.0fs", runner.source.name, delay)
                runner.source.health().error(f"runner restarted after error: {exc}")
                self.metrics.source_errors.labels(runner.source.name).inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                delay = min(delay * 2, 30.0)
                runner = SourceRunner(
                    runner.source,
                    self.pipeline,
                    self.decoder,
                    self.admission,
                    stopping=self.stopping,
                    on_pending=self._on_pending,
                )

    async def _tick(self) -> None:
        """Feed queue depth to admission (automatic brownout) and refresh gauges."""
        while not self.stopping.is_set():
            if self._webhook is not None:
                with contextlib.suppress(Exception):
                    await self._observe_intake(self._webhook)
            self.admission.set_queue_depth(self.queue_depth())
            self.refresh_gauges()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.5)

    async def _observe_intake(self, webhook: Any) -> None:
        """Feed the closed loop: records committed out of the intake, then its size."""
        records, _, nbytes = await webhook.refresh_backlog()
        committed = webhook.committed_records
        self.admission.intake.drained(committed - self._intake_committed)
        self._intake_committed = committed
        self.admission.intake.observe(records, nbytes)
        self._intake_backlog = records

    def queue_depth(self) -> int:
        return max(0, self._pending) + self._intake_backlog

    def refresh_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth())
        self.metrics.in_flight.set(self.admission.in_flight_count)
        self.metrics.set_backpressure(self.admission.state.value)
        for name, lane in self.lanes.items():
            self.metrics.set_breaker(name, lane.breaker.state.value)
        for source in self.sources:
            self.metrics.adapter_lag.labels(source.name).set(source.health().lag_seconds)

    async def health(self) -> dict[str, Any]:
        adapters = {s.name: {"kind": s.kind, **s.health().as_dict()} for s in self.sources}
        sinks: dict[str, Any] = {}
        for name, lane in self.lanes.items():
            try:
                conn = await asyncio.wait_for(lane.sink.health(), 2.0)
            except Exception as exc:
                conn = {"connected": False, "error": str(exc) or type(exc).__name__}
            snap = lane.breaker.snapshot()
            sinks[name] = {
                "kind": lane.sink.kind,
                "state": snap["state"],
                "breaker": snap,
                "connection": conn,
            }
        try:
            stores = await asyncio.wait_for(self.stores.health(), 2.0)
        except Exception as exc:
            stores = {"ok": False, "error": str(exc) or type(exc).__name__}
        backpressure = self.admission.snapshot()
        backpressure["queue_depth"] = self.queue_depth()
        degraded = (
            any(s["state"] != BreakerState.CLOSED.value for s in sinks.values())
            or any(a["status"] == "error" for a in adapters.values())
            or self.admission.state is not BackpressureState.NORMAL
        )
        return {
            "status": "degraded" if degraded else "ok",
            "mode": "embedded" if self.stores.sqlite_db is not None else "production",
            "worker": self.worker,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "adapters": adapters,
            "backpressure": backpressure,
            "sinks": sinks,
            "stores": stores,
            "store_errors": list(self.pipeline.store_errors),
        }

    async def shutdown(self, timeout: float = 60.0) -> None:
        """Drain: stop taking new work, finish and commit what is in flight, close."""
        log.info("shutting down: draining in-flight work")
        self.admission.drain()
        self.stopping.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                log.error("task %s did not finish in %.0fs; cancelling", task.get_name(), timeout)
                task.cancel()
        for source in self.sources:
            with contextlib.suppress(Exception):
                await source.close()
        if self.intake is not None:
            with contextlib.suppress(Exception):
                await self.intake.close()
        await self.core.close()  # sinks, then stores
        log.info("shutdown complete")


async def serve(
    cfg: C.Config,
    *,
    host: str | None = None,
    port: int | None = None,
    ready: Callable[[Service], None] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT: then drain, flush, checkpoint and return (exit 0)."""
    import uvicorn

    tune_gc()

    from ingest.api.app import build_app

    service = await Service.build(cfg)
    await service.start()
    app = build_app(service)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host or cfg.http.host,
            port=port if port is not None else cfg.http.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            # Longer than any Retry-After we answer, so a client that waited as told finds
            # its connection still open (a close racing its next POST looks like a failure).
            timeout_keep_alive=75,
        )
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Server._serve skips uvicorn's own signal capture: SIGTERM must drain the pipeline first.
    server_task = asyncio.create_task(server._serve())
    while not server.started and not server_task.done():
        await asyncio.sleep(0.02)
    if server_task.done():
        await service.shutdown(timeout=5)
        with contextlib.suppress(SystemExit):
            await server_task
        raise OSError(
            f"cannot serve HTTP on {server.config.host}:{server.config.port} "
            "(is the port in use? set http.port or INGEST_HTTP_PORT)"
        )
    if ready is not None:
        ready(service)
    await stop.wait()
    log.info("signal received")
    await service.shutdown()
    server.should_exit = True
    await server_task
