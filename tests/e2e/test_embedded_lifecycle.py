"""Embedded service lifecycle: throttling answers, CSV/gzip inbox files, SIGTERM mid-ingest."""

from __future__ import annotations

import csv
import gzip
import io
import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import wait_for as wait_until
from tests.e2e._service import ServiceProcess, metric_value

pytestmark = pytest.mark.e2e
TENANT = "acme-corp"


def record(i: int, revision: int = 1) -> dict[str, object]:
    return {"schema_version": 3, "tenant_id": TENANT, "entity_type": "order",
            "entity_id": f"o-{i}", "revision": revision, "occurred_at": "2025-01-01T00:00:00Z",
            "attributes": {"amount": float(i)}}


def test_throttled_tenant_gets_429_with_retry_after(tmp_path: Path) -> None:
    config = tmp_path / "ingest.yaml"
    config.write_text("tenants:\n  acme-corp: {rate: 1, burst: 5}\n")
    svc = ServiceProcess(tmp_path / "d", config=config).start()
    try:
        body = "\n".join(json.dumps(record(i)) for i in range(5))
        first = svc.post_webhook(TENANT, "shop", body, content_type="application/x-ndjson")
        assert first.status_code == 202
        second = svc.post_webhook(TENANT, "shop", body, content_type="application/x-ndjson")
        assert second.status_code == 429
        assert int(second.headers["Retry-After"]) >= 1
        assert second.json()["error"] == "throttled" and second.json()["reason"]
        m = svc.metrics()  # throttled lasts a second after the last wait: look at once
        assert 'ingest_backpressure_state{state="throttled"} 1.0' in m
        assert svc.health()["backpressure"]["state"] == "throttled"
        other = svc.post_webhook("other-tenant", "shop",
                                 json={**record(1), "tenant_id": "other-tenant"})
        assert other.status_code == 202  # the bucket is per tenant
    finally:
        svc.stop()


def test_a_body_that_can_never_be_accepted_is_413_not_429(tmp_path: Path) -> None:
    """More records than the tenant's burst, or than the intake ever holds, got 429 "send
    smaller batches": a 429 says "retry later", and a retry of the same body can never be
    accepted. 413 now, naming the limit and what to do, without Retry-After; health is not
    throttled by it, and a body within the limits is taken."""
    config = tmp_path / "ingest.yaml"
    config.write_text(
        "tenants:\n  acme-corp: {rate: 1000000, burst: 100}\n"
        "  other: {rate: 1000000, burst: 100000}\n"
        "admission:\n  intake: {max_backlog_records: 300, min_backlog_records: 50}\n"
    )
    svc = ServiceProcess(tmp_path / "d", config=config).start()

    def ndjson(tenant: str, n: int) -> str:
        return "\n".join(json.dumps({**record(i), "tenant_id": tenant}) for i in range(n))

    try:
        r = svc.post_webhook(TENANT, "shop", ndjson(TENANT, 101),
                             content_type="application/x-ndjson")  # fmt: skip
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "too_many_records" and "Retry-After" not in r.headers
        assert "burst" in r.json()["reason"] and "at most 100 records" in r.json()["reason"]

        def over_intake() -> bool:  # the intake's size is known from the service's first tick
            r = svc.post_webhook("other", "shop", ndjson("other", 301),
                                 content_type="application/x-ndjson")  # fmt: skip
            return r.status_code == 413

        wait_until(over_intake, 30, "413 for more records than the intake holds")
        r = svc.post_webhook("other", "shop", ndjson("other", 301),
                             content_type="application/x-ndjson")  # fmt: skip
        reason = r.json()["reason"]
        assert "300" in reason and "max_backlog_records" in reason and "split it" in reason
        assert r.status_code == 413 and "Retry-After" not in r.headers
        assert svc.health()["backpressure"]["intake"]["refused_requests"] >= 1
        # refusing one request for good throttles nobody (a 202 before the service's first
        # look at the intake could have, for 5 s)
        wait_until(lambda: svc.health()["backpressure"]["state"] == "normal", 30, "normal")
        ok = svc.post_webhook(TENANT, "shop", ndjson(TENANT, 100),
                              content_type="application/x-ndjson")  # fmt: skip
        assert ok.status_code == 202, ok.text
    finally:
        svc.stop()


def test_csv_and_gzip_files_are_read_once_and_moved_to_done(tmp_path: Path) -> None:
    svc = ServiceProcess(tmp_path / "d").start()
    try:
        inbox = svc.data_dir / "inbox" / TENANT
        inbox.mkdir(parents=True)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["schema_version", "tenant_id", "entity_type", "entity_id", "revision",
                    "occurred_at", "attributes.amount", "attributes.currency"])
        for i in range(300):
            w.writerow([3, TENANT, "order", f"c-{i}", 1, "2025-01-01T00:00:00Z", i + 0.5, "EUR"])
        w.writerow([3, TENANT, "order", "c-bad", 1, "2025-01-01T00:00:00Z", "lots", "EUR"])
        (tmp_path / "x.csv.gz").write_bytes(gzip.compress(buf.getvalue().encode()))
        (tmp_path / "x.csv.gz").rename(inbox / "orders.csv.gz")
        lines = "\n".join(json.dumps(record(i)) for i in range(1000, 1200)) + "\n"
        (tmp_path / "y.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
        (tmp_path / "y.jsonl.gz").rename(inbox / "more.jsonl.gz")
        wait_until(lambda: not any(p.is_file() for p in inbox.iterdir()), 60, "files done")
        wait_until(lambda: svc.health()["backpressure"]["queue_depth"] == 0, 30, "idle")
        assert sorted(p.name for p in (inbox / "done").iterdir()) == ["more.jsonl.gz",
                                                                    "orders.csv.gz"]
        sink = sqlite3.connect(svc.data_dir / "sink.db")
        assert sink.execute("SELECT count(*) FROM entities").fetchone()[0] == 500
        amount = sink.execute(
            "SELECT attributes FROM entities WHERE entity_id = 'c-7'").fetchone()[0]
        assert json.loads(amount) == {"amount": 7.5, "currency": "EUR"}
        state = sqlite3.connect(svc.data_dir / "state.db")
        reason, detail = state.execute("SELECT reason, detail FROM dlq").fetchone()
        assert reason == "SCHEMA_DRIFT"
        detail = json.loads(detail)
        assert detail["path"] == "$.attributes.amount" and "csv_header" in detail
    finally:
        svc.stop()


def test_sigterm_mid_ingest_drains_checkpoints_and_resumes_exactly(tmp_path: Path) -> None:
    data = tmp_path / "d"
    svc = ServiceProcess(data).start()
    inbox = data / "inbox" / TENANT
    inbox.mkdir(parents=True)
    n = 60_000
    (tmp_path / "big.jsonl").write_text("\n".join(json.dumps(record(i)) for i in range(n)) + "\n")
    (tmp_path / "big.jsonl").rename(inbox / "big.jsonl")
    wait_until(lambda: (svc.health()["adapters"]["inbox"]["last_checkpoint"] or {})
               .get("offset", 0) > 0, 60, "first commit")
    assert svc.terminate() == 0  # drain, flush, checkpoint, exit 0
    said = svc.log_path.read_text(errors="replace")
    assert "Traceback" not in said and " ERROR " not in said, said[-3000:]  # a clean stop
    sink = sqlite3.connect(data / "sink.db")
    landed = sink.execute("SELECT count(*) FROM entities").fetchone()[0]
    state = sqlite3.connect(data / "state.db")
    (cp,) = state.execute("SELECT value FROM checkpoints").fetchone()
    offset = json.loads(cp)["position"]["offset"]
    assert 0 < landed <= n and offset > 0
    svc = ServiceProcess(data).start()
    try:
        wait_until(lambda: not (inbox / "big.jsonl").exists(), 120, "file done")
        wait_until(lambda: svc.health()["backpressure"]["queue_depth"] == 0, 30, "idle")
        assert sink.execute("SELECT count(*) FROM entities").fetchone()[0] == n
        # The checkpoint was exact: the restart re-read nothing that had been delivered.
        assert metric_value(svc.metrics(), "ingest_records_total", outcome="duplicate") == 0
        assert metric_value(svc.metrics(), "ingest_records_total", outcome="delivered") == \
            n - landed
    finally:
        svc.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_service_on_the_same_data_dir_is_refused(tmp_path: Path, workers: str) -> None:
    """Two embedded services on one data dir both read its webhook intake (every record
    processed twice). The second is refused at once, in one line, exit 2; once the first is
    gone (kill -9 included: the kernel drops the lock) the data dir is free again."""
    import subprocess

    data = tmp_path / "d"
    env = {"INGEST_WORKERS": workers}
    first = ServiceProcess(data, env=env).start()
    try:
        second = ServiceProcess(data, env=env)
        out = subprocess.run(
            [*second.launcher, "run", "--port", str(second.port)], cwd=data, env=second.env,
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr[-3000:]
        said = out.stdout + out.stderr
        assert "Traceback" not in said
        assert "in use by another `ingest run`" in said, said
        assert f"pid {first.proc and first.proc.pid}" in said, said
        assert first.health()["status"] == "ok"
        first.kill9()
        again = ServiceProcess(data, env=env, port=second.port).start()
        again.stop()
    finally:
        first.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_one_line_not_a_traceback(tmp_path: Path, workers: str) -> None:
    """The HTTP port is in use: the service says so in one line naming the port and the
    setting, and exits 2 (a config error; docs/operations.md). A pod (workers > 1) printed
    three asyncio tracebacks per worker connection on the way out; both exited 3 (uvicorn's
    startup failure), which the docs define as "a store or server unreachable"."""
    import socket
    import subprocess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        svc = ServiceProcess(tmp_path / "d", env={"INGEST_WORKERS": workers})
        out = subprocess.run(
            [*svc.launcher, "run", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=svc.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    said = out.stdout + out.stderr
    assert out.returncode == 2, said[-3000:]
    flat = " ".join(said.split())  # the console wraps long lines
    assert f"127.0.0.1:{port}" in flat and "already in use" in flat, said[-3000:]
    assert "http.port" in flat, said[-3000:]
    assert "Traceback" not in said and "Exception in callback" not in said, said[-3000:]
    assert "shutting down" not in said, said[-3000:]  # refused before anything started
