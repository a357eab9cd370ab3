"""The newcomer's path, as the README writes it: start with `uv run --no-dev`, post, see the
records land (`ingest records`, `make records`), see the DLQ (`make dlq`), read the health's
DLQ count, stop with SIGTERM to the group and get exit 0."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import rec, wait_for
from tests.e2e._service import ROOT, ServiceProcess

pytestmark = pytest.mark.e2e
TENANT = "acme-corp"
UV_NO_DEV = ["uv", "run", "--frozen", "--no-dev", "--project", str(ROOT)]


def run(cmd: list[str], svc: ServiceProcess, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=svc.env, cwd=kw.pop("cwd", svc.data_dir), text=True,
                          capture_output=True, timeout=120, **kw)


@pytest.fixture
def svc(tmp_path: Path) -> Any:
    service = ServiceProcess(tmp_path / "data", env={"INGEST_WORKERS": "1"},
                             launcher=[*UV_NO_DEV, "ingest"]).start()
    try:
        yield service
    finally:
        service.stop()


def test_landed_records_dlq_and_a_clean_stop(svc: ServiceProcess) -> None:
    body = "\n".join(json.dumps(rec(f"o-{i}", attributes={"amount": i})) for i in range(3))
    body += "\n" + json.dumps(rec("o-bad", attributes={"amount": "lots"}))  # SCHEMA_DRIFT
    posted = svc.post_webhook(TENANT, "shop", body, content_type="application/x-ndjson")
    assert posted.status_code == 202
    wait_for(lambda: svc.health()["backpressure"]["queue_depth"] == 0
             and svc.health()["stores"]["state"].get("dlq_entries") == 1, 60, "delivered")

    out = run([*UV_NO_DEV, "ingest", "records", "--tenant", TENANT, "--json"], svc)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert sorted(r["entity_id"] for r in doc["records"]) == ["o-0", "o-1", "o-2"]
    for r in doc["records"]:
        assert re.fullmatch(r"[0-9a-f]{64}", r["dedupe_key"]), r["dedupe_key"]
        assert isinstance(r["attributes"], dict)
    limited = run([*UV_NO_DEV, "ingest", "records", "-t", TENANT, "--limit", "1", "--json"], svc)
    assert len(json.loads(limited.stdout)["records"]) == 1

    table = run(["make", "-s", "-C", str(ROOT), "records", f"TENANT={TENANT}"], svc)
    assert table.returncode == 0, table.stderr
    assert "o-1" in table.stdout and doc["records"][0]["dedupe_key"][:16] in table.stdout
    assert "\\x" not in table.stdout and "b'" not in table.stdout  # no binary key

    dlq = run(["make", "-s", "-C", str(ROOT), "dlq", f"TENANT={TENANT}"], svc)
    assert dlq.returncode == 0, dlq.stderr
    assert "SCHEMA_DRIFT" in dlq.stdout

    assert svc.terminate_group() == 0, svc.log()  # drained, checkpointed, exit 0 through uv
    assert "shutdown complete" in svc.log()


def test_records_outside_the_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "INGEST_DATA_DIR": str(tmp_path / "nothing-here")}
    out = subprocess.run([*UV_NO_DEV, "ingest", "records", "--tenant", TENANT], env=env,
                         text=True, capture_output=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 3
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "nothing-here").exists()  # a read never creates the sink


@pytest.mark.parametrize("command", [["ingest", "run"], ["ingest", "records"],
                                     ["dlqtriage", "summary"], ["replayctl", "list"]])
def test_help_shows_no_type_for_flags(command: list[str]) -> None:
    out = subprocess.run([*UV_NO_DEV, *command, "--help"], text=True, capture_output=True,
                         timeout=120, env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0, out.stderr
    assert "--help" in out.stdout and "<bool>" not in out.stdout
