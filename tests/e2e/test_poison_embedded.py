"""Issue 11 #1, as first seen on `make run`: a record with revision 2**63 (one past the
schema's maximum) must not strand its batch, stop webhook intake for every tenant, leave
that tenant's later inbox files pending, or come back after a restart. The service runs as a
process (embedded); each check is what an operator would look at.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for as wait_until
from tests.e2e._service import ServiceProcess, metric_value

pytestmark = pytest.mark.e2e
BIG = 2**63


def rec(tenant: str, eid: str, revision: int = 1) -> dict[str, Any]:
    return {"schema_version": 3, "tenant_id": tenant, "entity_type": "order", "entity_id": eid,
            "revision": revision, "occurred_at": "2025-01-01T00:00:00Z",
            "attributes": {"n": 1}}


def ndjson(*records: dict[str, Any]) -> str:
    return "\n".join(json.dumps(r) for r in records) + "\n"


def sink_ids(data: Path) -> set[tuple[str, str]]:
    if not (data / "sink.db").exists():
        return set()
    with sqlite3.connect(data / "sink.db") as c:
        return set(c.execute("SELECT tenant, entity_id FROM entities"))


def dlq(data: Path) -> list[tuple[str, str, int, int | None]]:
    with sqlite3.connect(data / "state.db") as c:
        return sorted(c.execute("SELECT tenant, source, attempts, revision FROM dlq"))


def drop(data: Path, tenant: str, name: str, text: str) -> None:
    folder = data / "inbox" / tenant
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f".{name}.tmp").write_text(text)
    (folder / f".{name}.tmp").rename(folder / name)


def post(svc: ServiceProcess, tenant: str, body: str) -> httpx.Response:
    return svc.post_webhook(tenant, "orders", body, content_type="application/x-ndjson")


def test_an_out_of_range_revision_stops_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    svc = ServiceProcess(data).start()
    try:
        # webhook: the bad record amid good ones, then other tenants, many requests
        assert post(svc, "acme", ndjson(rec("acme", "w1"), rec("acme", "w-big", BIG),
                                        rec("acme", "w2"))).status_code == 202
        for i in range(30):
            assert post(svc, "other", ndjson(rec("other", f"o{i}"))).status_code == 202
        # inbox: the bad line in acme's first file, then a second file of acme's
        drop(data, "acme", "a1.jsonl", ndjson(rec("acme", "f1"), rec("acme", "f-big", BIG)))
        time.sleep(1.2)
        drop(data, "acme", "a2.jsonl", ndjson(rec("acme", "f2")))
        want = ({("acme", e) for e in ("w1", "w2", "f1", "f2")}
                | {("other", f"o{i}") for i in range(30)})
        wait_until(lambda: sink_ids(data) >= want, 30, "every valid record in the sink")
        wait_until(lambda: not list((data / "inbox" / "acme").glob("*.jsonl")), 30,
                   "both acme files done")
        assert sink_ids(data) == want
        assert dlq(data) == [("acme", "inbox", 1, None), ("acme", "orders", 1, None)]
        wait_until(lambda: svc.health()["adapters"]["webhook"]["intake_backlog_records"] == 0,
                   10, "the intake empty")  # refreshed every 0.5 s
        h = svc.health()
        assert h["status"] == "ok", h["problems"]
        assert all(a["progress"]["restarts"] == 0 for a in h["adapters"].values())

        # a repeat has no second effect
        assert post(svc, "acme", ndjson(rec("acme", "w-big", BIG))).status_code == 202
        # (the health's intake backlog is refreshed every 0.5 s: right after the 202 it can
        # still say 0, so wait for the outcome itself)
        wait_until(lambda: metric_value(svc.metrics(), "ingest_records_total", tenant="acme",
                                        outcome="duplicate") >= 1, 10, "the repeat committed")
        wait_until(lambda: svc.health()["adapters"]["webhook"]["intake_backlog_records"] == 0,
                   10, "the intake empty")
        m = svc.metrics()
        assert metric_value(m, "ingest_dlq_total", tenant="acme") == 2
        assert metric_value(m, "ingest_records_total", tenant="acme", outcome="duplicate") == 1
        assert svc.terminate() == 0
        # ... not after a restart either
        svc = ServiceProcess(data, port=svc.port).start()
        time.sleep(2)
        assert dlq(data) == [("acme", "inbox", 1, None), ("acme", "orders", 1, None)]
        assert svc.health()["status"] == "ok"
        assert "Traceback" not in svc.log()
    finally:
        svc.stop()
