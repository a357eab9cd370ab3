"""INGEST_LOG_FORMAT=json: every log line of a pod (control plane and workers) is one JSON
object, and the lines about a batch say its tenant, source and batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import rec, wait_for
from tests.e2e._service import ServiceProcess

pytestmark = pytest.mark.e2e


def json_lines(svc: ServiceProcess) -> list[dict[str, Any]]:
    return [json.loads(x) for x in svc.log_path.read_text().splitlines() if x.startswith("{")]


def test_json_lines_carry_tenant_source_and_batch(tmp_path: Path) -> None:
    env = {"INGEST_LOG_FORMAT": "json", "INGEST_LOG_LEVEL": "DEBUG", "INGEST_WORKERS": "2"}
    svc = ServiceProcess(tmp_path / "data", env=env).start()
    try:
        inbox = svc.data_dir / "inbox" / "acme-corp"
        inbox.mkdir(parents=True)
        lines = "".join(json.dumps(rec(f"f-{i}")) + "\n" for i in range(5))
        (tmp_path / "a.tmp").write_text(lines)
        (tmp_path / "a.tmp").rename(inbox / "a.jsonl")
        body = json.dumps(rec("w-1", tenant="globex"))
        assert svc.post_webhook("globex", "shop", body).status_code == 202

        def committed() -> list[dict[str, Any]]:
            found = [d for d in json_lines(svc) if d["message"].startswith("committed")]
            tenants = {d.get("tenant") for d in found}
            return found if {"acme-corp", "globex"} <= tenants else []

        found = wait_for(committed, 90, "a committed line per tenant")
        by_tenant = {d["tenant"]: d for d in found}
        assert by_tenant["acme-corp"]["source"] == "inbox"
        assert by_tenant["globex"]["source"] == "webhook"
        for d in found:
            first, last = (int(x) for x in d["batch"].split("-"))
            assert first <= last
        assert svc.terminate() == 0
    finally:
        svc.stop()
    text = svc.log_path.read_text().splitlines()
    banner = [x for x in text if not x.startswith("{")]
    assert all(not x.startswith(("Traceback", "20")) for x in banner), banner  # no text logs
    assert any(d["logger"].startswith("ingest.pod") for d in json_lines(svc))  # control plane
