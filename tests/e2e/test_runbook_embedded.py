"""The runbook's Common Operations and Incident Response commands, as written, against `ingest run`.

Host `ingest-service:8080` becomes the test service's 127.0.0.1 address and curl sends the
operator token (`-H "Authorization: Bearer $INGEST_TOKEN"`, docs/security.md); everything else is
the runbook's text. Each command runs in bash, so pipes into jq/grep behave as for an operator.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.e2e._auth import bearer
from tests.e2e._service import ROOT, ServiceProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = ServiceProcess(tmp_path_factory.mktemp("runbook")).start()
    yield service
    service.stop()


def sh(svc: ServiceProcess, command: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["bash", "-o", "pipefail", "-c", svc.runbook(command)],
                         capture_output=True, text=True, timeout=30, cwd=ROOT, env=svc.env)
    assert out.returncode == 0, f"{command!r} failed ({out.returncode}): {out.stderr}"
    return out


def test_check_pipeline_status(svc: ServiceProcess) -> None:
    health = json.loads(sh(svc, "curl -s http://ingest-service:8080/health/detailed | jq").stdout)
    assert set(health) >= {"adapters", "backpressure", "sinks"}
    assert {"inbox", "webhook"} <= set(health["adapters"])
    for adapter in health["adapters"].values():
        assert {"status", "lag_seconds", "last_checkpoint", "errors"} <= set(adapter)
    assert health["sinks"]["sqlite"]["state"] == "closed"
    out = sh(svc, """curl -s http://ingest-service:8080/health/detailed | jq '.adapters["s3-main"]'""")  # noqa: E501 - the runbook's command, verbatim
    assert out.stdout.strip() == "null"  # no S3 adapter in the embedded default
    out = sh(svc, """curl -s http://ingest-service:8080/health/detailed | jq '.adapters["inbox"]'""")  # noqa: E501 - the runbook's command, verbatim
    assert json.loads(out.stdout)["status"] in ("idle", "running")
    bp = json.loads(sh(svc, "curl -s http://ingest-service:8080/health/detailed | jq '.backpressure'").stdout)  # noqa: E501 - the runbook's command, verbatim
    assert {"state", "since", "tokens", "in_flight", "queue_depth", "brownout_rate"} <= set(bp)
    assert bp["state"] == "normal"


def test_drain_and_resume(svc: ServiceProcess) -> None:
    sh(svc, "curl -X POST http://ingest-service:8080/admin/drain")
    bp = json.loads(sh(svc, 'curl -s http://ingest-service:8080/health/detailed | jq ".backpressure"').stdout)  # noqa: E501 - the runbook's command, verbatim
    assert bp["state"] == "drain"
    r = svc.post_webhook("acme-corp", "orders", json={"x": 1})
    assert r.status_code == 503 and r.json()["error"] == "drain"
    assert "retry later or against another instance" in r.json()["reason"]
    sh(svc, "curl -X POST http://ingest-service:8080/admin/resume")
    assert svc.health()["backpressure"]["state"] == "normal"


def test_brownout_with_rate_and_disable(svc: ServiceProcess) -> None:
    sh(svc, 'curl -X POST "http://ingest-service:8080/admin/brownout?rate=0.1"')
    bp = svc.health()["backpressure"]
    assert bp["state"] == "brownout" and bp["brownout_rate"] == pytest.approx(0.1)
    assert "ingest_backpressure_state{state=\"brownout\"} 1.0" in svc.metrics()
    sh(svc, "curl -X POST http://ingest-service:8080/admin/resume")
    assert svc.health()["backpressure"]["state"] == "normal"
    # Lag Critical step 2: brownout without a rate uses the configured default
    sh(svc, "curl -X POST http://ingest-service:8080/admin/brownout")
    bp = svc.health()["backpressure"]
    assert bp["state"] == "brownout" and 0 < bp["brownout_rate"] <= 1
    sh(svc, "curl -X POST http://ingest-service:8080/admin/resume")


def test_lag_high_query_and_retry_metrics(svc: ServiceProcess) -> None:
    out = sh(svc, "curl -s http://ingest-service:8080/health/detailed | \\\n"
                  "  jq '.adapters | to_entries | .[] | select(.value.lag_seconds > 60)'")
    assert out.stdout.strip() == ""  # nothing lags on an idle service
    out = sh(svc, "curl -s http://ingest-service:8080/metrics | grep ingest_retry_total")
    assert "ingest_retry_total" in out.stdout


def test_schema_file_as_in_runbook(svc: ServiceProcess) -> None:
    out = sh(svc, "cat ingest/schema/input.schema.json | jq")
    schema = json.loads(out.stdout)
    assert "schema_version" in schema["properties"]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/admin/brownout?rate=0", 400, "invalid_rate"),
        ("/admin/brownout?rate=1.5", 400, "invalid_rate"),
        ("/admin/brownout?rate=abc", 400, "invalid_rate"),
        ("/admin/drain?force=1", 400, "unknown_parameter"),
        ("/admin/reboot", 404, "unknown_action"),
        # an operator's slips: the rate given twice took the last one; a trailing slash got
        # 307 with an empty body, so `curl -X POST` printed nothing and changed nothing
        ("/admin/brownout?rate=0.1&rate=0.5", 400, "repeated_parameter"),
        ("/admin/drain/", 404, "not_found"),
    ],
)
def test_admin_refuses_with_reason(svc: ServiceProcess, path: str, status: int, code: str) -> None:
    r = httpx.post(f"{svc.url}{path}", headers=bearer("operator"))
    assert r.status_code == status
    assert r.json()["error"] == code and r.json()["reason"]
    assert svc.health()["backpressure"]["state"] == "normal"


def test_trailing_slash_says_what_to_drop(svc: ServiceProcess) -> None:
    out = sh(svc, "curl -s -X POST http://ingest-service:8080/admin/drain/")
    assert "drop the trailing slash (/admin/drain)" in json.loads(out.stdout)["reason"]
    out = sh(svc, "curl -s http://ingest-service:8080/health/detailed/ | jq -r .error")
    assert out.stdout.strip() == "not_found"
    assert svc.health()["backpressure"]["state"] == "normal"


def test_admin_without_token_names_the_role(svc: ServiceProcess) -> None:
    r = httpx.post(f"{svc.url}/admin/drain")
    assert r.status_code == 401 and "needs an operator token" in r.json()["reason"]


@pytest.mark.parametrize("query", ["summary?tenant=acme-corp&tenant=other",
                                   "sample?limit=1&limit=500"])
def test_dlq_endpoints_refuse_a_repeated_parameter(svc: ServiceProcess, query: str) -> None:
    r = svc.get(f"/admin/dlq/{query}")
    assert r.status_code == 400 and r.json()["error"] == "repeated_parameter", r.text


def test_get_on_admin_is_405_with_reason(svc: ServiceProcess) -> None:
    r = httpx.get(f"{svc.url}/admin/drain", headers=bearer("operator"))
    assert r.status_code == 405 and "POST" in r.json()["reason"]


def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path).start()
    assert service.terminate() == 0


def test_dlq_summary_endpoint_counts_records_as_the_cli_does(tmp_path: Path) -> None:
    """A record refused by two sinks is two entries but one record, for the rate too."""
    config = tmp_path / "two-sinks.yaml"
    config.write_text(f"sinks:\n  - {{type: sqlite, name: a, path: {tmp_path}/a.db}}\n"
                      f"  - {{type: sqlite, name: b, path: {tmp_path}/b.db}}\n")
    service = ServiceProcess(tmp_path / "data", config=config).start()
    try:
        inbox = service.data_dir / "inbox" / "acme-corp"
        inbox.mkdir(parents=True)
        for name, revision in (("new", 5), ("old", 3)):  # the older one: OLDER_REVISION twice
            rec = {"schema_version": 3, "tenant_id": "acme-corp", "entity_type": "order",
                   "entity_id": "x-1", "revision": revision,
                   "occurred_at": "2025-01-01T00:00:00Z", "attributes": {}}
            (inbox / f".{name}").write_text(json.dumps(rec) + "\n")
            (inbox / f".{name}").rename(inbox / f"{name}.jsonl")
            # committed (moved to done/), not only taken: the pod's other worker could
            # otherwise take old.jsonl and commit it first, and nothing would be older
            done = inbox / "done" / f"{name}.jsonl"
            wait_for(done.exists, what=f"{name}.jsonl committed")
        wait_for(lambda: service.get("/admin/dlq/summary").json()["total"] == 2,
                 what="two DLQ entries")
        api = service.get("/admin/dlq/summary?tenant=acme-corp").json()
        cli = json.loads(subprocess.run(
            [str(Path(sys.executable).parent / "dlqtriage"), "summary", "--tenant", "acme-corp",
             "--json", "-c", str(config)],
            cwd=tmp_path, env=service.env, capture_output=True, text=True, timeout=60,
            check=True).stdout)
        assert (api["total"], api["records"], api["processed"]) == (2, 1, 2)
        assert api["dlq_rate"] == cli["dlq_rate"] == 0.5
    finally:
        service.stop()
