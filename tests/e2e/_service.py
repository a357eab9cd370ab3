"""Run the service as an operator would: a process, driven over HTTP and signals.

The service authenticates webhooks and operator calls (docs/security.md). `ServiceProcess`
writes the test session's credentials into its data dir and points the service at them, so:

    svc.post_webhook("acme-corp", "shop", body)      # signed for that tenant
    svc.post_webhook("acme-corp", "shop", json=rec)  # same, body = the JSON of rec
    svc.admin("drain")  svc.admin("brownout", rate=0.1)   # operator calls, all-roles token
    svc.get("/health/detailed")                      # viewer calls
    svc.env["INGEST_TOKEN"]                          # for curl -H "Authorization: Bearer ..."
Clients posting on their own: `sign_headers(tenant, body)` and `bearer(role)` from _auth.
`ServiceProcess(..., auth=False)` starts it with no credentials (what that means is the test's).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.e2e._auth import TOKENS, bearer, sign_headers, write_credentials

ROOT = Path(__file__).resolve().parents[2]
# Starting is not what these tests measure: on 2 cores shared with other work a start took
# over 60 s (load 22), so no start is given up on sooner (INGEST_TEST_START_WAIT seconds).
START_WAIT = float(os.environ.get("INGEST_TEST_START_WAIT", "180"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """`ingest run` in a subprocess with its own data dir and port."""

    def __init__(self, data_dir: Path, config: Path | None = None,
                 env: dict[str, str] | None = None, port: int | None = None,
                 auth: bool = True, launcher: list[str] | None = None) -> None:
        self.data_dir = data_dir
        # How `ingest` is started: this interpreter, or e.g. `uv run --no-dev ingest` as the
        # README says.
        self.launcher = launcher or [sys.executable, "-m", "ingest.cli.ingest"]
        self.config = config
        self.port = port or free_port()
        self.env = {**os.environ, "INGEST_DATA_DIR": str(data_dir)}
        if auth:
            data_dir.mkdir(parents=True, exist_ok=True)
            self.env["INGEST_CREDENTIALS_FILE"] = str(write_credentials(data_dir))
            self.env["INGEST_TOKEN"] = TOKENS["admin"]
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"service-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 60.0) -> ServiceProcess:  # a pod starts N+1 processes
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*self.launcher, "run", "--host", "127.0.0.1",
               "--port", str(self.port)]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        # Its own process group, so kill_group() reaches a pod's workers and nothing else.
        self.proc = subprocess.Popen(cmd, cwd=self.data_dir, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait = max(wait, START_WAIT)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health/live", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"service did not become ready in {wait}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def health(self, timeout: float = 5) -> dict[str, Any]:
        r = self.get("/health/detailed", timeout=timeout)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def get(self, path: str, role: str = "admin", **kw: Any) -> httpx.Response:
        """GET with the session's token of `role` (viewer reads: health, DLQ, audit)."""
        kw.setdefault("timeout", 10)
        return httpx.get(f"{self.url}{path}", headers=bearer(role), **kw)

    def admin(self, action: str, role: str = "admin", timeout: float = 10,
              **params: Any) -> httpx.Response:
        """POST /admin/<action>?params with the session's token of `role`."""
        return httpx.post(f"{self.url}/admin/{action}", params=params or None,
                          headers=bearer(role), timeout=timeout)

    def post_webhook(self, tenant: str, source: str, body: bytes | str | None = None, *,
                     json: Any = None, content_type: str = "application/json",
                     client: httpx.Client | None = None, timeout: float = 10) -> httpx.Response:
        """POST /v1/webhooks/<tenant>/<source>, signed as `tenant` over the exact bytes sent."""
        raw = orjson.dumps(json) if body is None else body
        raw = raw.encode() if isinstance(raw, str) else raw
        url = f"{self.url}/v1/webhooks/{tenant}/{source}"
        headers = sign_headers(tenant, raw, content_type=content_type)
        if client is not None:
            return client.post(url, content=raw, headers=headers, timeout=timeout)
        return httpx.post(url, content=raw, headers=headers, timeout=timeout)

    def runbook(self, command: str) -> str:
        """A runbook command for bash (with env=self.env): the host becomes this service, and
        curl sends the operator token, the one documented difference (docs/security.md)."""
        return command.replace("http://ingest-service:8080", self.url).replace(
            "curl ", 'curl -H "Authorization: Bearer $INGEST_TOKEN" ')

    def metrics(self) -> str:  # /metrics stays open for scrapes
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def kill_group(self) -> None:
        """kill -9 the whole pod: control plane and every worker at the same instant."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def worker_pids(self) -> dict[str, int]:
        """A pod's worker processes (workers > 1), from /health/detailed `.workers`."""
        return {name: w["pid"] for name, w in self.health().get("workers", {}).items()
                if w["status"] == "running"}

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def terminate_group(self, timeout: float = 60.0) -> int:
        """SIGTERM to the whole process group, as a terminal's Ctrl-C or a supervisor does."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """kill -9 the process group (its own session): with a launcher such as `uv run`,
        killing the launcher alone would leave the service running."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def finished(svc: ServiceProcess, inbox: Path) -> bool:
    """The crash tests' end: no file left in the tenant's inbox and nothing queued."""
    try:
        h = svc.health()
    except httpx.HTTPError:
        return False
    return not any(p.is_file() for p in inbox.iterdir()) and h["backpressure"]["queue_depth"] == 0


def ingest_cli(*args: str, timeout: float = 60) -> str:
    """`ingest ARGS` as a process (this interpreter); its stdout, or the test fails with its
    stderr."""
    out = subprocess.run(
        [sys.executable, "-m", "ingest.cli.ingest", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout
