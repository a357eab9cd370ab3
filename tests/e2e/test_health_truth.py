"""Issue 11 #10 as an operator sees it: health is not `ok` while parts fail.

The service runs as a process with an S3 source whose endpoint refuses connections and a
Postgres sink nobody listens for (both on free local ports, so nothing real is needed): the
adapter must show lag and count its errors, the sink must show unreachable before any
breaker trips, and the top-level status, problems, metrics and readiness must agree.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for as wait_until
from tests.e2e._service import ServiceProcess, free_port, metric_value

pytestmark = pytest.mark.e2e


def test_failing_source_and_unreachable_sink_are_not_ok(tmp_path: Path) -> None:
    s3_port, pg_port = free_port(), free_port()
    config = tmp_path / "ingest.yaml"
    config.write_text(f"""
health: {{stall_after_seconds: 3, probe_seconds: 1}}
sources:
  - {{type: inbox}}
  - {{type: webhook}}
  - type: s3
    name: s3-main
    url: s3://bucket/prefix/
    tenant: acme
    endpoint_url: http://127.0.0.1:{s3_port}
    access_key_id: k
    secret_access_key: s
    poll_seconds: 0.5
sinks:
  - {{type: sqlite, name: sqlite}}
  - {{type: postgres, name: postgres, dsn: "postgresql://u:p@127.0.0.1:{pg_port}/db"}}
""")
    svc = ServiceProcess(tmp_path / "data", config=config).start(wait=180)
    try:
        wait_until(lambda: svc.health()["adapters"]["s3-main"]["stalled"], 60, "s3 stalled")
        h = svc.health()
        s3 = h["adapters"]["s3-main"]
        assert s3["lag_seconds"] >= 3 and s3["errors"] and s3["error_count"] >= 1
        assert s3["status"] == "stalled", s3
        assert h["sinks"]["postgres"]["state"] == "closed"  # no write yet: breaker untouched
        assert h["sinks"]["postgres"]["connection"]["connected"] is False
        assert h["status"] == "degraded"
        components = {p["component"] for p in h["problems"]}
        assert {"source:s3-main", "sink:postgres"} <= components
        m = svc.metrics()
        assert metric_value(m, "ingest_source_errors_total", adapter="s3-main") >= 1
        assert metric_value(m, "ingest_adapter_lag_seconds", adapter="s3-main") >= 3
        assert metric_value(m, "ingest_source_stalled", adapter="s3-main") == 1
        assert metric_value(m, "ingest_sink_up", sink="postgres") == 0
        assert metric_value(m, "ingest_sink_up", sink="sqlite") == 1
        # degraded, not unhealthy: the pod still takes traffic (sqlite and the inbox work)
        assert httpx.get(f"{svc.url}/health/ready", timeout=5).status_code == 200
        assert httpx.get(f"{svc.url}/health/live", timeout=5).status_code == 200
        svc.admin("drain")
        ready = httpx.get(f"{svc.url}/health/ready", timeout=5)
        assert ready.status_code == 503 and "draining" in ready.json()["reasons"]
        assert svc.terminate() == 0
    finally:
        svc.stop()
