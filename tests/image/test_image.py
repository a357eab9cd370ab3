"""The container image, run as Kubernetes runs it (deploy/k8s): `make image-test`.

Built by scripts/image/build.sh (INGEST_IMAGE, default localhost/ingest:latest); started with
podman the way the Deployment's securityContext starts it: uid 10001, read-only root
filesystem, a writable data dir and /tmp only, every capability dropped, no privilege
escalation. Credentials come from an environment variable, as from a Secret
(INGEST_CREDENTIALS). Not part of `make test` (tests/conftest.py leaves this directory out
unless INGEST_IMAGE_TEST=1): it needs root and podman, which `make image-test` sets up.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from ingest.auth import credentials as C
from tests.e2e._auth import bearer, credentials, sign_headers
from tests.e2e._service import free_port

IMAGE = os.environ.get("INGEST_IMAGE", "localhost/ingest:latest")
ROOT = Path(__file__).resolve().parents[2]
UID = 10001
START_WAIT = float(os.environ.get("INGEST_TEST_START_WAIT", "180"))


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    if not os.environ.get("CONTAINERS_CONF"):
        pytest.fail(
            "run through `make image-test` (it sets CONTAINERS_CONF for this host)", pytrace=False
        )
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


class Container:
    """One `podman run` of the image with a data dir on the host."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = free_port()
        self.name = f"ingest-image-test-{uuid.uuid4().hex[:8]}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Container:
        podman(
            "run",
            "-d",
            "--name",
            self.name,
            "--user",
            f"{UID}:{UID}",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "-v",
            f"{self.data}:/var/lib/ingest",
            "-e",
            "INGEST_CREDENTIALS",  # the value from this process's environment
            "-e",
            "INGEST_WORKERS=2",
            "-p",
            f"127.0.0.1:{self.port}:8080",
            IMAGE,
        )
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            if self.state() != "running":
                pytest.fail(f"container exited:\n{self.logs()}", pytrace=False)
            try:
                r = httpx.get(f"{self.url}/health/ready", timeout=2)
                if r.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"not ready in {START_WAIT}s:\n{self.logs()}", pytrace=False)

    def state(self) -> str:
        return podman("inspect", "-f", "{{.State.Status}}", self.name).stdout.strip()

    def logs(self) -> str:
        out = podman("logs", self.name, check=False)
        return out.stdout + out.stderr

    def sigterm(self) -> int:
        """SIGTERM to PID 1, as the kubelet sends it; the exit code once it has stopped."""
        podman("kill", "--signal", "TERM", self.name)
        return int(podman("wait", self.name, timeout=120).stdout.strip())

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, UID, UID)
    return data


@pytest.fixture
def container(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Container]:
    monkeypatch.setenv("INGEST_CREDENTIALS", C.dump(credentials()))
    c = Container(data_dir)
    try:
        yield c.start()
    finally:
        c.remove()


def record(i: int) -> bytes:
    return orjson.dumps(
        {
            "schema_version": 3,
            "tenant_id": "acme-corp",
            "entity_type": "order",
            "entity_id": f"o-{i}",
            "revision": 1,
            "occurred_at": "2025-01-01T00:00:00Z",
            "attributes": {"amount": i},
        }
    )


def post(c: Container, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{c.url}/v1/webhooks/acme-corp/orders",
        content=body,
        headers=sign_headers("acme-corp", body),
        timeout=30,
    )


def sink_ids(data: Path) -> set[str]:
    db = data / "sink.db"
    if not db.exists():
        return set()
    with sqlite3.connect(db, timeout=10) as conn:
        try:
            rows = conn.execute(
                "SELECT entity_id FROM entities WHERE tenant = 'acme-corp'"
            ).fetchall()
        except sqlite3.OperationalError:  # not migrated yet
            return set()
    return {r[0] for r in rows}


def wait_for_ids(data: Path, want: set[str], wait: float = 60) -> set[str]:
    deadline = time.monotonic() + wait
    got = sink_ids(data)
    while not want <= got and time.monotonic() < deadline:
        time.sleep(0.2)
        got = sink_ids(data)
    return got


# Every process in the container: pid, state, parent, uids, command line (the image has
# Python, no ps).
PROCESSES = r"""
import json, os
out = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        status = open(f"/proc/{pid}/status").read()
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        continue
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    uids = next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1:]
    out.append({"pid": int(pid), "state": state, "ppid": int(ppid), "uids": uids, "cmd": cmd})
print(json.dumps(out))
"""


def processes(c: Container) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = orjson.loads(
        podman("exec", c.name, "/usr/bin/python3.11", "-c", PROCESSES).stdout
    )
    return [p for p in found if PROCESSES.strip()[:20] not in " ".join(p["cmd"])]


def test_image_ships_the_code_it_was_built_from() -> None:
    """Every module of `ingest` in the image is the one in this tree (uv's cache once kept
    handing the build the wheel it had built first: an image of stale code)."""
    digest = (
        "import hashlib, pathlib, ingest\n"
        "root = pathlib.Path(ingest.__file__).parent\n"
        "for p in sorted(root.rglob('*.py')):\n"
        "    print(p.relative_to(root), hashlib.sha256(p.read_bytes()).hexdigest())\n"
    )
    shipped = podman(
        "run", "--rm", "--entrypoint", "/app/.venv/bin/python", IMAGE, "-c", digest
    ).stdout.splitlines()
    root = ROOT / "ingest"
    here = [
        f"{p.relative_to(root)} {hashlib.sha256(p.read_bytes()).hexdigest()}"
        for p in sorted(root.rglob("*.py"))
    ]
    assert sorted(shipped) == sorted(here), sorted(set(shipped) ^ set(here))[:10]


def test_image_runs_the_compiled_decoder() -> None:
    """The image's decoder is the compiled one (ingest_native, built in the build stage), and
    the service's start-up log says so."""
    check = (
        "import logging\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from ingest.pipeline.decode import Decoder\n"
        "print(Decoder().path)\n"
    )
    run = podman("run", "--rm", "--entrypoint", "/app/.venv/bin/python", IMAGE, "-c", check)
    assert run.stdout.split() == ["compiled"], run.stdout + run.stderr
    assert "decoder: compiled fast path (ingest_native)" in run.stderr, run.stderr


def test_image_runs_non_root_with_the_service_under_tini_as_pid_1(container: Container) -> None:
    """PID 1 is tini (it reaps the orphans a pod's workers can leave, and hands SIGTERM on),
    its child `ingest run`; every process runs as the image's user."""
    user = podman("image", "inspect", "-f", "{{.Config.User}}", IMAGE).stdout.strip()
    assert user and not user.startswith(("0", "root")), user
    procs = {p["pid"]: p for p in processes(container)}
    assert procs[1]["cmd"][:3] == ["/usr/bin/tini", "-s", "--"], procs[1]
    service = [p for p in procs.values() if p["ppid"] == 1]
    assert len(service) == 1, service
    cmd = service[0]["cmd"]
    assert cmd[:3] == ["/app/.venv/bin/python", "/app/.venv/bin/ingest", "run"] or cmd[1:3] == [
        "/app/.venv/bin/ingest",
        "run",
    ], cmd
    assert {u for p in procs.values() for u in p["uids"]} == {str(UID)}, procs


def test_workers_orphaned_by_a_dead_fork_server_are_reaped(container: Container) -> None:
    """kill -9 of a pod's fork server: its workers die with it (PR_SET_PDEATHSIG), handed to
    PID 1 first, and the control plane starts them again. PID 1 must reap the dead ones: the
    service as PID 1 never did, and each such death left zombies behind."""
    procs = processes(container)
    forks = [p for p in procs if "multiprocessing.forkserver" in " ".join(p["cmd"])]
    servers = [p for p in forks if p["ppid"] not in {f["pid"] for f in forks}]  # not a worker
    assert len(servers) == 1, procs
    workers = {p["pid"] for p in procs if p["ppid"] == servers[0]["pid"]}
    assert len(workers) == 2, procs
    kill = f"import os; os.kill({servers[0]['pid']}, 9)"
    podman("exec", container.name, "/usr/bin/python3.11", "-c", kill)
    deadline = time.monotonic() + START_WAIT
    while True:  # both workers started again (new pids), the pod ready
        with contextlib.suppress(httpx.TransportError):
            r = httpx.get(f"{container.url}/health/detailed", headers=bearer("viewer"), timeout=5)
            pids = {w["pid"] for w in r.json()["workers"].values() if w["status"] == "running"}
            if len(pids) == 2 and not pids & workers:
                break
        assert time.monotonic() < deadline, container.logs()
        time.sleep(0.5)
    deadline = time.monotonic() + 30
    while zombies := [p for p in processes(container) if p["state"] == "Z"]:
        assert time.monotonic() < deadline, f"not reaped: {zombies}"
        time.sleep(0.5)


def test_ready_signed_record_lands_unsigned_refused(container: Container) -> None:
    ready = httpx.get(f"{container.url}/health/ready", timeout=5)
    assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
    live = httpx.get(f"{container.url}/health/live", timeout=5)
    assert live.status_code == 200, live.text

    unsigned = httpx.post(
        f"{container.url}/v1/webhooks/acme-corp/orders",
        content=record(0),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert unsigned.status_code == 401, unsigned.text
    assert unsigned.json()["error"] == "missing_credential"

    r = post(container, record(1))
    assert r.status_code == 202, r.text
    assert wait_for_ids(container.data, {"o-1"}) == {"o-1"}, container.logs()


def test_sigterm_drains_and_exits_0_nothing_lost(container: Container) -> None:
    """Records accepted just before SIGTERM are all in the sink after a restart on the same
    data dir (the pod's volume): accepted means durable, a drain loses nothing."""
    n, per_body = 2000, 100  # JSON arrays: many records in flight at once, few requests
    for start in range(0, n, per_body):
        body = b"[" + b",".join(record(i) for i in range(start, start + per_body)) + b"]"
        r = post(container, body)
        assert r.status_code == 202, r.text
    t0 = time.monotonic()
    code = container.sigterm()
    took = time.monotonic() - t0
    logs = container.logs()
    assert code == 0, logs
    assert "shutdown complete" in logs, logs
    assert "Traceback" not in logs, logs
    print(f"SIGTERM to exit: {took:.1f}s")

    container.remove()
    again = Container(container.data)
    try:
        again.start()
        want = {f"o-{i}" for i in range(n)}
        got = wait_for_ids(container.data, want)
        assert got == want, f"missing {sorted(want - got)[:10]}\n{again.logs()}"
    finally:
        again.remove()
