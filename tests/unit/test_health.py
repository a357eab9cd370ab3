"""Health tells the truth: status from every part, stall detection, readiness and liveness.

Real pipeline and admission on real SQLite; the sink and source are test doubles whose
health answers are set by the test; time is a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ingest.config import HealthConfig
from ingest.health import HealthMonitor
from ingest.pipeline.progress import SourceProgress
from ingest.pipeline.worker import Pipeline
from ingest.state.sqlite import SQLiteDB
from tests.unit.test_runner import ListSource
from tests.unit.test_worker import FakeSleep, MemorySink, make_pipeline


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class ProbedSink(MemorySink):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.answer: dict[str, Any] = {"connected": True}

    async def health(self) -> dict[str, Any]:
        return self.answer


@pytest.fixture()
async def db(tmp_path: Path) -> AsyncIterator[SQLiteDB]:
    database = await SQLiteDB.open(tmp_path / "state.db")
    yield database
    await database.close()


def monitor(pipe: Pipeline, sources: list[ListSource], clock: Clock,
            stores: dict[str, Any] | None = None) -> HealthMonitor:
    progress = {s.name: SourceProgress(clock=clock) for s in sources}
    store_answer = stores if stores is not None else {"state": {"ok": True}}

    async def probe_stores() -> dict[str, Any]:
        return store_answer

    mon = HealthMonitor(
        cfg=HealthConfig(stall_after_seconds=60, lag_slo_seconds=60),
        metrics=pipe.metrics, admission=pipe.admission, pipeline=pipe, lanes=pipe.lanes,
        probe_stores=probe_stores, sources=lambda: sources, progress=progress,
        queue_depth=lambda: 0, clock=clock,
    )
    mon.started = True
    return mon


async def test_all_parts_fine_is_ok_and_ready(db: SQLiteDB) -> None:
    pipe = make_pipeline(db, {"a": ProbedSink("a")}, FakeSleep())
    mon = monitor(pipe, [ListSource([])], Clock())
    view = await mon.detailed()
    assert view["status"] == "ok" and view["problems"] == [] and view["ready"] is True
    for key in ("adapters", "backpressure", "sinks", "stores", "disk"):
        assert key in view
    assert mon.live()[0] and mon.ready()[0]


async def test_an_unreachable_sink_is_not_ok_before_its_breaker_trips(db: SQLiteDB) -> None:
    """Bug: health said ok while a sink was unreachable, until its breaker opened."""
    a, b = ProbedSink("a"), ProbedSink("b")
    pipe = make_pipeline(db, {"a": a, "b": b}, FakeSleep())
    mon = monitor(pipe, [ListSource([])], Clock())
    a.answer = {"connected": False, "error": "connection refused"}
    view = await mon.detailed()
    assert pipe.lanes["a"].breaker.state.value == "closed"
    assert view["status"] == "degraded"
    assert [p["component"] for p in view["problems"]] == ["sink:a"]
    assert pipe.metrics.registry.get_sample_value("ingest_sink_up", {"sink": "a"}) == 0
    b.answer = {"connected": False, "error": "timeout"}
    view = await mon.detailed()
    assert view["status"] == "unhealthy"
    assert mon.ready()[0]  # every pod shares the sinks; this one's intake still works


async def test_a_breaker_not_closed_is_degraded(db: SQLiteDB) -> None:
    pipe = make_pipeline(db, {"a": ProbedSink("a"), "b": ProbedSink("b")}, FakeSleep(),
                         threshold=1)
    pipe.lanes["a"].breaker.record_failure()
    view = await monitor(pipe, [ListSource([])], Clock()).detailed()
    assert view["status"] == "degraded"
    assert view["problems"][0]["message"] == "circuit breaker open"


async def test_a_store_down_is_unhealthy(db: SQLiteDB) -> None:
    pipe = make_pipeline(db, {"a": ProbedSink("a")}, FakeSleep())
    mon = monitor(pipe, [ListSource([])], Clock(),
                  stores={"redis": {"connected": False, "error": "refused"}})
    view = await mon.detailed()
    assert view["status"] == "unhealthy"
    assert mon.ready()[0]  # a shared store: every pod alike, traffic is no better elsewhere


async def test_this_pods_own_state_store_failing_is_not_ready(db: SQLiteDB) -> None:
    pipe = make_pipeline(db, {"a": ProbedSink("a")}, FakeSleep())
    mon = monitor(pipe, [ListSource([])], Clock(),
                  stores={"state": {"ok": False, "error": "disk I/O error"}})
    await mon.detailed()
    ok, body = mon.ready()
    assert not ok and body["reasons"] == ["unhealthy: store:state: disk I/O error"]


async def test_pending_work_that_does_not_move_is_stalled(db: SQLiteDB) -> None:
    pipe = make_pipeline(db, {"a": ProbedSink("a")}, FakeSleep())
    clock = Clock()
    src = ListSource([])
    mon = monitor(pipe, [src], clock)
    progress = mon.progress["mem"]
    progress.read(10)
    clock.now += 30
    assert (await mon.detailed())["adapters"]["mem"]["stalled"] is False
    clock.now += 31
    view = await mon.detailed()
    entry = view["adapters"]["mem"]
    assert entry["stalled"] is True and entry["status"] == "stalled"
    assert entry["progress"]["pending_records"] == 10
    assert pipe.metrics.registry.get_sample_value("ingest_source_stalled", {"adapter": "mem"}) == 1
    assert "source:mem" in [p["component"] for p in view["problems"]]
    progress.committed(10)  # it moves again
    view = await mon.detailed()
    assert view["adapters"]["mem"]["stalled"] is False
    assert pipe.metrics.registry.get_sample_value("ingest_source_stalled", {"adapter": "mem"}) == 0


async def test_held_work_is_not_stalled(db: SQLiteDB) -> None:
    pipe = make_pipeline(db, {"a": ProbedSink("a")}, FakeSleep())
    clock = Clock()
    mon = monitor(pipe, [ListSource([])], clock)
    mon.progress["mem"].read(5)
    pipe.admission.pause()
    clock.now += 600
    view = await mon.detailed()
    assert view["adapters"]["mem"]["stalled"] is False
    ok, body = mon.ready()
    assert not ok and "paused" in body["reasons"]


async def test_an_erroring_source_shows_lag_and_counts_its_errors(db: SQLiteDB) -> None:
    """Bug: a failing S3 adapter showed lag_seconds 0 and ingest_source_errors_total 0."""
    pipe = make_pipeline(db, {"a": ProbedSink("a")}, FakeSleep())
    clock = Clock()
    src = ListSource([])
    mon = monitor(pipe, [src], clock)
    mon.observe()
    src.health().status = "error"
    src.health().error("CONNECTION_ERROR: S3 unreachable")
    src.health().error("CONNECTION_ERROR: S3 unreachable")
    clock.now += 90
    view = await mon.detailed()
    entry = view["adapters"]["mem"]
    assert entry["lag_seconds"] == pytest.approx(90)
    assert pipe.metrics.registry.get_sample_value(
        "ingest_source_errors_total", {"adapter": "mem"}) == 2
    assert pipe.metrics.registry.get_sample_value(
        "ingest_adapter_lag_seconds", {"adapter": "mem"}) == pytest.approx(90)
    assert entry["stalled"] is True  # erroring for longer than stall_after: not moving
    assert view["status"] == "degraded"


async def test_an_erroring_adapters_problem_is_what_health_says(db: SQLiteDB) -> None:
    """A source that knows why it is in error (Kafka: commits refused past
    commit_stuck_seconds) says so in `problem`: that, not its last error event, is the
    message of its `degraded` problem."""
    pipe = make_pipeline(db, {"a": ProbedSink("a")}, FakeSleep())
    src = ListSource([])
    mon = monitor(pipe, [src], Clock())
    src.health().status = "error"
    src.health().error("kafka: some later event")
    src.health().problem = "Kafka commits refused for 31s (since ...)"
    view = await mon.detailed()
    assert view["status"] == "degraded"
    assert {"component": "source:mem", "severity": "degraded",
            "message": "Kafka commits refused for 31s (since ...)"} in view["problems"]  # fmt: skip
    assert view["adapters"]["mem"]["problem"] == "Kafka commits refused for 31s (since ...)"


async def test_liveness_fails_when_the_heartbeat_stops(db: SQLiteDB) -> None:
    pipe = make_pipeline(db, {"a": ProbedSink("a")}, FakeSleep())
    mon = monitor(pipe, [ListSource([])], Clock())
    assert mon.live()[0]
    mon._beat = time.monotonic() - 31
    ok, body = mon.live()
    assert not ok and body["status"] == "stuck"
    assert not mon.ready()[0]
