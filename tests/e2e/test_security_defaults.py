"""Secure defaults, as a new user meets them: loopback only, dev credentials printed on the first
embedded start (and the printed commands work), production refuses to start without
credentials unless `auth: disabled` says so, and /admin/* on a port of its own."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import require_env, wait_for
from tests.e2e._service import ServiceProcess, free_port

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def banner(svc: ServiceProcess) -> str:
    wait_for(lambda: "stop: Ctrl-C" in svc.log(), 30, "the start banner")
    return svc.log()


def test_first_embedded_start_generates_dev_credentials_and_prints_commands_that_work(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    svc = ServiceProcess(data, auth=False).start()
    try:
        for name in ("credentials.yaml", "admin-token"):
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
        token = (data / "admin-token").read_text().strip()
        text = banner(svc)
        assert f"export INGEST_TOKEN={token}" in text
        assert token not in (data / "credentials.yaml").read_text()  # stored hashed only
        # the banner's curl + openssl lines, run as printed
        lines = text.splitlines()
        i = next(n for n, ln in enumerate(lines) if ln.strip().startswith("body='"))
        script = "\n".join(ln.strip() for ln in lines[i : i + 3])
        assert "openssl dgst -sha256 -hmac" in script and "X-Ingest-Signature" in script
        out = subprocess.run(["bash", "-c", script.replace("127.0.0.1:8080", svc.url[7:])],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert json.loads(out.stdout)["status"] == "accepted", out.stdout + out.stderr
        # ... and the one-line signer
        rec = '{"schema_version":3,"tenant_id":"acme-corp","entity_type":"order","entity_id":"o-9","revision":1,"occurred_at":"2025-01-01T00:00:00Z","attributes":{}}'  # noqa: E501
        out = subprocess.run([str(BIN / "ingest"), "post", "acme-corp/orders", rec, "--url",
                              svc.url], capture_output=True, text=True, timeout=30,
                             env=svc.env, cwd=tmp_path)  # fmt: skip
        assert out.returncode == 0 and json.loads(out.stdout)["records"] == 1, out.stderr
        # the operator token works, nothing works without it
        assert httpx.get(f"{svc.url}/health/detailed").status_code == 401
        h = httpx.get(f"{svc.url}/health/detailed", headers={"Authorization": f"Bearer {token}"})
        assert h.status_code == 200 and h.json()["auth"]["mode"] == "dev"
        assert httpx.post(f"{svc.url}/admin/pause").status_code == 401
        assert h.json()["backpressure"]["state"] == "normal"
    finally:
        svc.stop()
    again = ServiceProcess(data, auth=False).start()  # second start: the same credentials
    try:
        assert (data / "admin-token").read_text().strip() == token
        assert f"export INGEST_TOKEN={token}" in banner(again)
    finally:
        again.stop()


def test_default_listen_address_is_loopback(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([str(BIN / "ingest"), "run", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**ServiceProcess(tmp_path / "data").env})  # fmt: skip
    try:
        wait_for(lambda: _listening(proc.pid, port), 30, "the listener")
        assert _listening(proc.pid, port) == {"127.0.0.1"}
    finally:
        proc.kill()
        proc.wait(10)


def _listening(pid: int, port: int) -> set[str]:
    try:
        conns = psutil.Process(pid).net_connections(kind="inet")
    except psutil.Error:
        return set()
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def prod_config(path: Path, extra: str = "") -> Path:
    pg = require_env("INGEST_TEST_POSTGRES_URL", "postgres")
    redis = require_env("INGEST_TEST_REDIS_URL", "redis").rsplit("/", 1)[0] + "/14"
    path.write_text(f"state:\n  kind: production\n  redis_url: {redis}\n  postgres_url: {pg}\n"
                    "sources: [{type: webhook}]\nsinks: [{type: sqlite}]\n" + extra)  # fmt: skip
    return path


def test_production_refuses_to_start_without_credentials(tmp_path: Path) -> None:
    cfg = tmp_path / "prod.yaml"
    cfg.write_text("state:\n  kind: production\n  redis_url: redis://127.0.0.1:1/0\n"
                   "  postgres_url: postgresql://u:p@127.0.0.1:1/db\n")  # fmt: skip
    env = {k: v for k, v in ServiceProcess(tmp_path / "d", auth=False).env.items()
           if k not in ("INGEST_CREDENTIALS_FILE", "INGEST_CREDENTIALS")}  # fmt: skip
    t0 = time.monotonic()
    out = subprocess.run([str(BIN / "ingest"), "run", "--config", str(cfg), "--port",
                          str(free_port())], capture_output=True, text=True, timeout=60,
                         env=env)  # fmt: skip
    said = " ".join(out.stderr.split())
    assert out.returncode == 2, said
    assert "production mode needs credentials" in said and "auth: disabled" in said
    assert "Traceback" not in out.stderr and time.monotonic() - t0 < 30
    assert not (tmp_path / "d" / "credentials.yaml").exists()


def test_production_with_auth_disabled_says_so(tmp_path: Path) -> None:
    cfg = prod_config(tmp_path / "prod.yaml", "auth: disabled\n")
    svc = ServiceProcess(tmp_path / "data", cfg, auth=False).start(wait=60)
    try:
        h = httpx.get(f"{svc.url}/health/detailed", timeout=10)
        assert h.status_code == 200 and h.json()["auth"]["mode"] == "disabled"
        assert "auth: disabled" in svc.log()
        r = httpx.post(f"{svc.url}/v1/webhooks/acme-corp/orders", json={"x": 1}, timeout=10)
        assert r.status_code == 202
    finally:
        svc.stop()


def test_admin_on_its_own_port(tmp_path: Path) -> None:
    admin_port = free_port()
    svc = ServiceProcess(tmp_path / "data", env={"INGEST_ADMIN_PORT": str(admin_port)}).start()
    try:
        auth = {"Authorization": f"Bearer {svc.env['INGEST_TOKEN']}"}
        r = httpx.post(f"{svc.url}/admin/drain", headers=auth, timeout=10)
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        admin = f"http://127.0.0.1:{admin_port}"
        assert httpx.post(f"{admin}/admin/drain", timeout=10).status_code == 401
        assert httpx.post(f"{admin}/admin/drain", headers=auth, timeout=10).status_code == 200
        assert svc.health()["backpressure"]["state"] == "drain"
        assert httpx.post(f"{admin}/admin/resume", headers=auth, timeout=10).status_code == 200
        for base in (svc.url, admin):
            assert httpx.get(f"{base}/health/live", timeout=10).status_code == 200
            assert httpx.get(f"{base}/metrics", timeout=10).status_code == 200
        assert svc.post_webhook("acme-corp", "orders", json={"x": 1}).status_code == 202
        r = httpx.post(f"{admin}/v1/webhooks/acme-corp/orders", timeout=10)
        assert r.status_code == 404  # webhooks stay on the main port
        assert re.search(r"admin.*" + str(admin_port), banner(svc))
    finally:
        svc.stop()
