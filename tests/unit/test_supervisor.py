"""The supervisor: a source whose runner dies is rebuilt and run again, visibly, and what the
dead run read but did not commit is read again (nothing stranded until a process restart).

A real embedded Service (SQLite state and sink, inbox and webhook sources) in this process;
the failure is injected by making the webhook source's first commit raise.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from ingest.config import parse_config
from ingest.service import Service
from ingest.sources.base import SourceBatch


def rec(eid: str) -> bytes:
    return orjson.dumps({"schema_version": 3, "tenant_id": "acme", "entity_type": "order",
                         "entity_id": eid, "revision": 1,
                         "occurred_at": "2025-01-01T00:00:00Z", "attributes": {}})


def sink_ids(data: Path) -> set[str]:
    with sqlite3.connect(data / "sink.db") as c:
        return {r for (r,) in c.execute("SELECT entity_id FROM entities")}


async def test_a_dead_runner_is_rebuilt_and_its_uncommitted_batch_read_again(
        tmp_path: Path) -> None:
    cfg = parse_config({"data_dir": str(tmp_path), "health": {"stall_after_seconds": 60}})
    service = await Service.build(cfg)
    webhook = service._webhook
    assert webhook is not None
    original_commit = webhook.commit
    calls = 0

    async def failing_commit(batch: SourceBatch) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("checkpoint JSON cannot encode this")
        await original_commit(batch)

    webhook.commit = failing_commit  # type: ignore[method-assign]
    await service.start()
    try:
        assert service.intake is not None
        await service.intake.append("acme", "orders", [rec("e1"), rec("e2")], 0.0)
        service.notify_webhook()
        async with asyncio.timeout(20):
            while not service.progress["webhook"].restarts:
                await asyncio.sleep(0.05)
            health: dict[str, Any] = await service.health()
            assert health["adapters"]["webhook"]["status"] == "restarting"
            assert any(p["component"] == "source:webhook" for p in health["problems"])
            # rebuilt from its config: the rows the dead run read are read again
            while sink_ids(tmp_path) != {"e1", "e2"}:
                await asyncio.sleep(0.05)
            while (await service.health())["adapters"]["webhook"]["intake_backlog_records"]:
                await asyncio.sleep(0.05)
        assert service.sources[[s.name for s in service.sources].index("webhook")] is not webhook
        health = await service.health()
        entry = health["adapters"]["webhook"]
        assert entry["status"] != "restarting" and entry["progress"]["restarts"] == 1
        assert "RuntimeError" in entry["progress"]["last_restart_error"]
        assert any("checkpoint JSON" in e for e in entry["errors"])  # history kept
        sample = service.metrics.registry.get_sample_value
        assert sample("ingest_source_restarts_total", {"adapter": "webhook"}) == 1
        assert sample("ingest_source_errors_total", {"adapter": "webhook"}) >= 1
        # the new source takes new work as well
        await service.intake.append("acme", "orders", [rec("e3")], 0.0)
        service.notify_webhook()
        async with asyncio.timeout(10):
            while "e3" not in sink_ids(tmp_path):
                await asyncio.sleep(0.05)
    finally:
        await service.shutdown(timeout=10)
