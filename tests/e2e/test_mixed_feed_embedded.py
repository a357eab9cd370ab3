"""A mixed feed through `ingest run` (embedded): exact sink rows, DLQ reasons and /metrics.

Inbox files and webhook posts carry valid records, exact duplicates, older revisions, v1/v2
records, schema drift, validation failures, malformed lines and an oversized body. The test
knows what each line must become and checks the sink, the DLQ and /metrics agree with it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e._service import ServiceProcess, metric_value

pytestmark = pytest.mark.e2e
TENANT = "acme-corp"


def v3(entity_id: str, revision: int, **attrs: Any) -> dict[str, Any]:
    return {"schema_version": 3, "tenant_id": TENANT, "entity_type": "order",
            "entity_id": entity_id, "revision": revision,
            "occurred_at": "2025-01-01T00:00:00Z", "attributes": attrs or {"amount": 1.0}}


def line(obj: dict[str, Any]) -> str:
    return json.dumps(obj)


@pytest.fixture()
def svc(tmp_path: Path) -> Iterator[ServiceProcess]:
    config = tmp_path / "ingest.yaml"
    config.write_text("http:\n  max_body_bytes: 20000\n")
    service = ServiceProcess(tmp_path / "data-root", config=config).start()
    yield service
    service.stop()


def wait_idle(svc: ServiceProcess, inbox: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = svc.health()
        files_left = [p for p in inbox.glob("*") if p.is_file()]
        # queue_depth counts the webhook intake as of its last look (every 0.5 s): right
        # after a 202 it said 0 in 13 of 20 tries; intake.records counts what was accepted
        # since that look too
        bp = h["backpressure"]
        if not files_left and bp["queue_depth"] == 0 and bp["intake"]["records"] == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"service did not finish: {svc.health()}")


def test_mixed_feed_lands_exactly(svc: ServiceProcess) -> None:
    inbox = svc.data_dir / "inbox" / TENANT
    inbox.mkdir(parents=True)
    valid = [v3(f"o-{i}", 1, amount=float(i), currency="EUR") for i in range(50)]
    lines = [line(r) for r in valid]
    lines += [line(valid[0]), line(valid[1])]  # 2 exact duplicates
    lines += [line(v3("x-1", 5)), line(v3("x-1", 3))]  # rev 3 after rev 5: OLDER_REVISION
    lines += [line(v3("x-2", 2)), line(v3("x-2", 7))]  # both applied in order, 7 wins
    v1 = {"schema_version": 1, "tenant": TENANT, "type": "order", "id": "old-1", "rev": 1,
          "ts": 1735689600, "data": {"amount": 5}}
    v2 = {"schema_version": 2, "tenant_id": TENANT, "entity_type": "order", "entity_id": "old-2",
          "revision": 1, "occurred_at": "2025-01-01T00:00:00Z", "attributes": {"amount": 6}}
    lines += [line(v1), line(v2)]
    drift = [
        v3("d-1", 1, amount="12.50"),  # retyped attribute
        {k: v for k, v in v3("d-2", 1).items() if k != "entity_id"},  # missing field
        {**{k: v for k, v in v3("d-3", 1).items() if k != "entity_id"}, "entityId": "d-3"},
        {**v3("d-4", 1), "schema_version": 9},  # unknown version
    ]
    invalid = [
        v3("v-1", 1, amount=-3.0),  # out of range
        v3("v-2", 1, currency="eur"),  # pattern
        {**v3("v-3", 1), "occurred_at": "yesterday"},  # format
        {**v3("v-4", 1), "tenant_id": "someone-else"},  # tenant of the inbox dir differs
    ]
    lines += [line(r) for r in drift] + [line(r) for r in invalid]
    lines += ["{not json", "[1, 2]"]  # malformed: not JSON, not an object
    (inbox / ".orders.jsonl.tmp").write_text("\n".join(lines) + "\n")
    (inbox / ".orders.jsonl.tmp").rename(inbox / "orders.jsonl")

    web_valid = [v3(f"w-{i}", 1) for i in range(10)]
    r = svc.post_webhook(TENANT, "shop", "\n".join(line(x) for x in web_valid) + "\n{oops\n",
                         content_type="application/x-ndjson")
    assert r.status_code == 202, r.text
    assert r.json()["records"] == 11 and r.json()["malformed"] == 1
    r = svc.post_webhook(TENANT, "shop", json=web_valid[0])  # duplicate of an accepted record
    assert r.status_code == 202
    r = svc.post_webhook(TENANT, "shop", b"this is not json")
    assert r.status_code == 400 and r.json()["error"] == "invalid_json"
    big = [v3(f"big-{i}", 1, name="x" * 400) for i in range(60)]
    r = svc.post_webhook(TENANT, "shop", json=big)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    wait_idle(svc, inbox)

    sink = sqlite3.connect(svc.data_dir / "sink.db")
    rows = dict(sink.execute("SELECT entity_id, revision FROM entities"))
    expected_rows = {f"o-{i}": 1 for i in range(50)} | {f"w-{i}": 1 for i in range(10)}
    expected_rows |= {"x-1": 5, "x-2": 7, "old-1": 1, "old-2": 1}
    assert rows == expected_rows

    state = sqlite3.connect(svc.data_dir / "state.db")
    dlq = Counter(r for (r,) in state.execute("SELECT reason FROM dlq"))
    assert dlq == {"SCHEMA_DRIFT": 4, "VALIDATION_FAIL": 4 + 2 + 1, "OLDER_REVISION": 1}
    detail = json.loads(state.execute(
        "SELECT detail FROM dlq WHERE entity_id = 'd-1'").fetchone()[0])
    assert detail["path"] == "$.attributes.amount" and detail["expected"] == "number"
    older = json.loads(state.execute(
        "SELECT detail FROM dlq WHERE reason = 'OLDER_REVISION'").fetchone()[0])
    assert older["stored_revision"] == 5 and older["incoming_revision"] == 3
    payload = state.execute("SELECT payload FROM dlq WHERE entity_id = 'v-2'").fetchone()[0]
    assert json.loads(payload) == invalid[1]  # the original bytes

    text = svc.metrics()
    assert metric_value(text, "ingest_records_total", outcome="delivered") == len(expected_rows) + 1
    assert metric_value(text, "ingest_records_total", outcome="duplicate") == 3
    assert metric_value(text, "ingest_records_total", outcome="dlq") == sum(dlq.values())
    for reason, n in dlq.items():
        assert metric_value(text, "ingest_dlq_total", reason=reason) == n
    assert metric_value(text, "ingest_lag_seconds_count", sink="sqlite") == len(expected_rows) + 1
