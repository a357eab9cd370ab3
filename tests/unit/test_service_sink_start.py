"""The service starts its sinks beside its sources (`Service.start`): a source's first batch is
read, decoded and handed to the pipeline while a sink is still starting, its write waits for
that start, and the sink is started once (`SinkLane.ensure_started` shared by both callers).

A real embedded Service (SQLite state and sink, an inbox source) in this process; the sink's
start is held until the test lets it go.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import parse_config
from ingest.pipeline.breaker import CircuitBreaker
from ingest.pipeline.worker import SinkLane
from ingest.service import Service


def rec(eid: str) -> bytes:
    return orjson.dumps({"schema_version": 3, "tenant_id": "acme", "entity_type": "order",
                         "entity_id": eid, "revision": 1,
                         "occurred_at": "2025-01-01T00:00:00Z", "attributes": {}})  # fmt: skip


def sink_ids(data: Path) -> set[str]:
    with sqlite3.connect(data / "sink.db") as c:
        return {r for (r,) in c.execute("SELECT entity_id FROM entities")}


async def test_the_first_batch_is_read_while_the_sink_starts_and_written_after(
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox" / "acme"
    inbox.mkdir(parents=True)
    (inbox / "orders.jsonl").write_bytes(b"\n".join(rec(f"e{i}") for i in range(3)) + b"\n")
    cfg = parse_config({"data_dir": str(tmp_path), "health": {"stall_after_seconds": 60}})
    service = await Service.build(cfg)
    (lane,) = service.core.lanes.values()
    gate = asyncio.Event()
    starts = 0
    start_sink = lane.sink.start

    async def held_start() -> None:
        nonlocal starts
        starts += 1
        await gate.wait()
        await start_sink()

    lane.sink.start = held_start  # type: ignore[method-assign]
    handed = asyncio.Event()
    write = service.pipeline.write

    async def noted_write(*args: Any, **kwargs: Any) -> Any:
        handed.set()
        return await write(*args, **kwargs)

    service.pipeline.write = noted_write  # type: ignore[method-assign]
    starting = asyncio.create_task(service.start())
    try:
        # the inbox's batch reaches the pipeline while the sink's start is held
        await asyncio.wait_for(handed.wait(), 20)
        assert not starting.done() and starts == 1 and not lane.started
        gate.set()
        await asyncio.wait_for(starting, 20)
        async with asyncio.timeout(20):
            while sink_ids(tmp_path) != {"e0", "e1", "e2"}:
                await asyncio.sleep(0.05)
        assert starts == 1 and lane.started  # one start, shared by the service and the write
    finally:
        gate.set()
        if not starting.done():
            await starting
        await service.shutdown(timeout=10)


class _Sink:
    """A sink whose start yields (`turns` times) and fails the first `failures` times."""

    name = "s"

    def __init__(self, turns: int, failures: int) -> None:
        self.turns, self.failures, self.starts, self.running = turns, failures, 0, 0

    async def start(self) -> None:
        self.starts += 1
        self.running += 1
        assert self.running == 1, "two starts at once"
        try:
            for _ in range(self.turns):
                await asyncio.sleep(0)
            if self.starts <= self.failures:
                raise ConnectionError("sink down")
        finally:
            self.running -= 1


@settings(max_examples=60, deadline=None)
@given(callers=st.integers(1, 6), turns=st.integers(0, 3), failures=st.integers(0, 3))
def test_concurrent_ensure_started_run_one_start_at_a_time_until_one_succeeds(
    callers: int, turns: int, failures: int
) -> None:
    sink = _Sink(turns, failures)
    lane = SinkLane(sink, CircuitBreaker("s"))  # type: ignore[arg-type]

    async def main() -> list[BaseException | None]:
        return await asyncio.gather(
            *(lane.ensure_started() for _ in range(callers)), return_exceptions=True
        )

    results = asyncio.run(main())
    failed = [r for r in results if r is not None]
    assert all(isinstance(r, ConnectionError) for r in failed)
    # each caller either saw a failed start of its own or the one success: never a second
    # start after the sink was up, never two starts at once (asserted inside the sink)
    assert sink.starts == min(callers, failures) + (1 if callers > failures else 0)
    assert lane.started == (callers > failures)
