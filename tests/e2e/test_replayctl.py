"""`replayctl` as operators run it: processes against the stores the real service wrote.

The embedded service is put in brownout (rate 0.1) and fed low-priority records once per module,
so most are dropped into the `dropped` table; each test works on a copy of that data dir and
runs the runbook's Replay Operations as written. The S3 test replays objects from SeaweedFS
(own prefix); the Postgres test keeps its plans in a schema of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.conftest import require_env, wait_for
from tests.e2e._service import ServiceProcess, free_port, metric_value

pytestmark = pytest.mark.e2e
TENANT = "acme-corp"
REPLAYCTL = str(Path(sys.executable).parent / "replayctl")
INGEST = str(Path(sys.executable).parent / "ingest")
N_LOW, N_NORMAL = 300, 20


def v3(entity_id: str, priority: str) -> dict[str, Any]:
    return {"schema_version": 3, "tenant_id": TENANT, "entity_type": "order",
            "entity_id": entity_id, "revision": 1, "priority": priority,
            "occurred_at": "2025-01-01T00:00:00Z", "attributes": {"amount": 1.0}}


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def rctl(cwd: Path, *args: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("INGEST_DATA_DIR", "INGEST_CONFIG", "INGEST_LEGAL_HOLD_URL",
                         "INGEST_REPLAY_RFA_THRESHOLD")}
    # alice writes plans; approvals say `--as bob` (four eyes: never the plan's author)
    return subprocess.run([REPLAYCTL, *args], cwd=cwd, env={**base, "INGEST_ACTOR": "alice",
                                                             **(env or {})},
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def said(r: subprocess.CompletedProcess[str]) -> str:
    return " ".join((r.stdout + r.stderr).split())


def rjson(cwd: Path, *args: str, env: dict[str, str] | None = None, code: int = 0) -> Any:
    r = rctl(cwd, *args, "--json", env=env)
    assert r.returncode == code, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout)


def count(db: Path, sql: str) -> int:
    # closing(): a connection left to the garbage collector deletes the -wal file whenever it
    # is collected, e.g. in the middle of the next test's copytree of the same directory.
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as c:
        return int(c.execute(sql).fetchone()[0])


WINDOW: tuple[str, str] = ("", "")


@pytest.fixture(scope="module")
def browned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """<root>/data after a brownout fed N_LOW low + N_NORMAL normal records; (root, drops)."""
    global WINDOW
    root = tmp_path_factory.mktemp("browned")
    svc = ServiceProcess(root / "data").start()
    try:
        r = svc.admin("brownout", rate=0.1)
        assert r.status_code == 200, r.text
        inbox = svc.data_dir / "inbox" / TENANT
        inbox.mkdir(parents=True, exist_ok=True)
        recs = [v3(f"low-{i}", "low") for i in range(N_LOW)]
        recs += [v3(f"n-{i}", "normal") for i in range(N_NORMAL)]
        (inbox / ".orders.tmp").write_text("".join(json.dumps(x) + "\n" for x in recs))
        (inbox / ".orders.tmp").rename(inbox / "orders.jsonl")
        data = svc.data_dir

        def settled() -> bool:
            if not (data / "sink.db").exists():
                return False
            sunk = count(data / "sink.db", "SELECT count(*) FROM entities")
            return sunk + count(data / "state.db", "SELECT count(*) FROM dropped") == len(recs)

        wait_for(settled, what="every record in the sink or the dropped store")
        assert svc.terminate() == 0
    finally:
        svc.stop()
    drops = count(root / "data" / "state.db", "SELECT count(*) FROM dropped")
    assert 200 < drops < N_LOW  # rate 0.1 keeps about a tenth of the low-priority records
    now = time.time()
    WINDOW = (iso(now - 3600), iso(now + 3600))
    return root, drops


@pytest.fixture()
def root(browned: tuple[Path, int], tmp_path: Path) -> Path:
    shutil.copytree(browned[0] / "data", tmp_path / "data",
                    ignore=shutil.ignore_patterns("*.log"))
    return tmp_path


def plan_dropped(root: Path, throttle: str = "1000", env: dict[str, str] | None = None) -> Any:
    return rjson(root, "plan", "--tenant", TENANT, "--from", WINDOW[0], "--to", WINDOW[1],
                 "--sources", "inbox-dropped", "--throttle", throttle, env=env)


def sink_ids(data: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(data / "sink.db")) as c:
        return [r[0] for r in c.execute("SELECT entity_id FROM entities WHERE tenant = ?",
                                         (TENANT,))]


def test_runbook_replay_of_brownout_drops(root: Path, browned: tuple[Path, int]) -> None:
    data, drops = root / "data", browned[1]
    before = sink_ids(data)
    assert len(before) == N_LOW + N_NORMAL - drops

    r = rctl(root, "plan", "--tenant", TENANT, "--from", WINDOW[0], "--to", WINDOW[1],
             "--sources", "inbox-dropped", "--throttle", "1000")
    assert r.returncode == 0, r.stderr
    plan_id = r.stdout.splitlines()[0]
    assert plan_id.startswith("rp-") and len(plan_id) == 11
    st = rjson(root, "status", plan_id)
    assert st["state"] == "pending_approval" and st["estimate_records"] == drops
    assert st["sources"][0]["name"] == "inbox-dropped" and st["throttle"] == 1000
    assert st["window"] == {"from": WINDOW[0], "to": WINDOW[1]}
    assert st["legal_hold"] == "no legal-hold service configured"

    small = {"INGEST_REPLAY_RFA_THRESHOLD": "100"}
    r = rctl(root, "run", "--plan", plan_id)
    assert r.returncode == 2 and f"plan {plan_id} is not approved yet" in said(r)
    r = rctl(root, "approve", plan_id, "--rfa", "RFA-1234")  # by its author: four eyes refuse
    assert r.returncode == 2 and f"plan {plan_id} was written by alice; four eyes" in said(r)
    assert rjson(root, "status", plan_id)["state"] == "pending_approval"
    r = rctl(root, "approve", plan_id, "--as", "bob", env=small)
    assert r.returncode == 2
    assert f"large replay (of {drops} records, threshold 100)" in said(r)
    assert "--rfa RFA-<number>" in said(r)
    r = rctl(root, "approve", plan_id, "--as", "bob", "--rfa", "RFA-12x", env=small)
    assert r.returncode == 2 and "--rfa 'RFA-12x' is not an RFA id" in said(r)
    r = rctl(root, "approve", plan_id, "--as", "bob", "--rfa", "RFA-1234", env=small)
    assert r.returncode == 0 and "approved by bob" in said(r) and "RFA-1234" in said(r)
    r = rctl(root, "approve", plan_id, "--as", "bob", "--rfa", "RFA-1234")
    assert r.returncode == 2
    assert f"plan {plan_id} is already approved (approved by bob under RFA-1234)" in said(r)

    done = rjson(root, "run", "--plan", plan_id)
    assert done["state"] == "completed" and done["last_error"] is None
    prog = done["progress"]["inbox-dropped"]
    assert (prog["read"], prog["delivered"], prog["dlq"], prog["done"]) == (drops, drops, 0, True)
    assert done["records_done"] == drops and done["finished_at"] >= done["started_at"]

    after = sink_ids(data)
    assert len(after) == len(set(after)) == N_LOW + N_NORMAL  # every record exactly once
    assert set(after) == {f"low-{i}" for i in range(N_LOW)} | {f"n-{i}" for i in range(N_NORMAL)}
    assert count(data / "state.db", "SELECT count(*) FROM dropped") == 0
    assert count(data / "state.db", "SELECT count(*) FROM dlq") == 0

    r = rctl(root, "status", plan_id)
    flat = said(r)
    assert r.returncode == 0 and "completed" in flat and "alice" in flat and "RFA-1234" in flat
    r = rctl(root, "run", "--plan", plan_id)
    assert r.returncode == 2 and f"plan {plan_id} already completed" in said(r)
    r = rctl(root, "approve", plan_id, "--as", "bob")
    assert r.returncode == 2 and "already completed" in said(r)

    # a small replay (nothing left in the window) is approved without an RFA
    second = plan_dropped(root)
    assert second["estimate_records"] == 0
    ok = rjson(root, "approve", second["id"], "--as", "bob")
    assert ok["state"] == "approved" and ok["rfa"] is None and ok["approved_by"] == "bob"
    listed = rjson(root, "list", "--tenant", TENANT)
    assert [p["id"] for p in listed] == [second["id"], plan_id]
    assert [p["records_done"] for p in listed] == [0, drops]
    assert rjson(root, "list", "--tenant", "nobody") == []
    r = rctl(root, "list", "--tenant", TENANT)
    assert r.returncode == 0 and plan_id in r.stdout and second["id"] in r.stdout

    # the audit trail: who planned, who tried and who approved, who ran, from where
    out = subprocess.run([INGEST, "audit", "--json", "--action", "replay."], cwd=root,
                         capture_output=True, text=True, timeout=60, check=True)
    trail = [(r["action"], r["actor"], r["outcome"], r["target"])
             for r in reversed(json.loads(out.stdout))]  # fmt: skip
    assert trail[:9] == [
        ("replay.plan", "alice", "ok", plan_id),
        ("replay.run.end", "alice", "refused", plan_id),  # not approved yet
        ("replay.approve", "alice", "refused", plan_id),  # four eyes
        ("replay.approve", "bob", "refused", plan_id),  # no RFA for a large replay
        ("replay.approve", "bob", "refused", plan_id),  # RFA-12x
        ("replay.approve", "bob", "ok", plan_id),
        ("replay.approve", "bob", "refused", plan_id),  # already approved
        ("replay.run.start", "alice", "ok", plan_id),
        ("replay.run.end", "alice", "ok", plan_id),
    ]
    rows = json.loads(out.stdout)
    assert all(r["via"] == "cli" and r["remote"].startswith("cli@") for r in rows)


def test_interrupted_run_resumes_where_it_stopped(root: Path, browned: tuple[Path, int]) -> None:
    data, drops = root / "data", browned[1]
    plan_id = plan_dropped(root, throttle="60")["id"]
    rjson(root, "approve", plan_id, "--as", "bob", "--rfa", "RFA-7")
    env = {k: v for k, v in os.environ.items() if k not in ("INGEST_DATA_DIR", "INGEST_CONFIG")}
    proc = subprocess.Popen([REPLAYCTL, "run", "--plan", plan_id, "--json"], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: count(data / "state.db", "SELECT count(*) FROM dropped") < drops - 60,
                 timeout=30, what="part of the replay")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    half = json.loads(out)
    assert half["state"] == "interrupted"
    first = half["progress"]["inbox-dropped"]["delivered"]
    assert 0 < first < drops
    assert count(data / "state.db", "SELECT count(*) FROM dropped") == drops - first

    done = rjson(root, "run", "--plan", plan_id)
    assert done["state"] == "completed"
    assert done["progress"]["inbox-dropped"]["delivered"] == drops  # counts kept, none twice
    assert done["started_at"] == half["started_at"]
    ids = sink_ids(data)
    assert len(ids) == len(set(ids)) == N_LOW + N_NORMAL


class _Holds(BaseHTTPRequestHandler):
    holds: ClassVar[list[dict[str, Any]]] = []
    asked: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Holds.asked.append(self.path)
        body = json.dumps({"holds": _Holds.holds}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_legal_hold_blocks_until_lifted(root: Path, browned: tuple[Path, int]) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Holds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"INGEST_LEGAL_HOLD_URL": f"http://127.0.0.1:{server.server_port}"}
        plan_id = plan_dropped(root)["id"]
        rjson(root, "approve", plan_id, "--as", "bob", "--rfa", "RFA-9")
        _Holds.holds = [{"id": "LH-77", "tenant": TENANT, "active": True}]
        r = rctl(root, "run", "--plan", plan_id, env=env)
        assert r.returncode == 1
        assert (f"refusing to run plan {plan_id}: active legal hold for tenant {TENANT}: LH-77"
                in said(r))
        assert _Holds.asked[-1] == f"/holds?tenant={TENANT}"
        st = rjson(root, "status", plan_id, env=env)
        assert st["state"] == "blocked_legal_hold" and "LH-77" in st["legal_hold"]
        assert count(root / "data" / "state.db", "SELECT count(*) FROM dropped") == browned[1]

        _Holds.holds = [{"id": "LH-77", "tenant": TENANT, "active": False}]
        done = rjson(root, "run", "--plan", plan_id, env=env)
        assert done["state"] == "completed" and done["records_done"] == browned[1]
        url = env["INGEST_LEGAL_HOLD_URL"]
        assert done["legal_hold"] == f"no active legal hold for {TENANT} at {url}"
    finally:
        server.shutdown()


def test_replay_progress_in_status_and_the_service_metrics(
    root: Path, browned: tuple[Path, int]
) -> None:
    """A replay running in replayctl shows on the service's /metrics (read from the plan
    store) and in `replayctl status` (bar, ETA, RTO); killed, it shows as not moving.
    replayctl is frozen (SIGSTOP) as soon as the store says two batches are in: the checks of
    a replay part-way through then hold however slow the host is (under load, the throttled
    run of ~17 s once finished before the checks and the kill were through)."""
    data, drops = root / "data", browned[1]
    r = rctl(root, "plan", "--tenant", TENANT, "--from", WINDOW[0], "--to", WINDOW[1],
             "--sources", "inbox-dropped", "--throttle", "16", "--rto", "3s")
    assert r.returncode == 0, r.stderr
    plan_id = r.stdout.splitlines()[0]
    assert "needs at least" in said(r) and "more than its RTO of 3s" in said(r)
    rjson(root, "approve", plan_id, "--as", "bob", "--rfa", "RFA-11")
    svc = ServiceProcess(data).start()
    env = {k: v for k, v in os.environ.items() if k not in ("INGEST_DATA_DIR", "INGEST_CONFIG")}
    proc = subprocess.Popen([REPLAYCTL, "run", "--plan", plan_id, "--json"], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lab = {"tenant": TENANT, "plan": plan_id}
        # two batches of 16 out of the dropped store: the plan saved after the first is in
        # the plan store (each batch is delivered, deleted from `dropped`, then saved)
        wait_for(lambda: count(data / "state.db", "SELECT count(*) FROM dropped") <= drops - 32,
                 timeout=60, what="two replayed batches")
        proc.send_signal(signal.SIGSTOP)  # part-way, and it stays there until the kill

        def moving() -> bool:
            m = svc.metrics()
            return (metric_value(m, "ingest_replay_records_total", **lab) >= 16
                    and metric_value(m, "ingest_replay_state", state="running", **lab) == 1)

        wait_for(moving, timeout=60, what="the running replay on the service's /metrics")
        m = svc.metrics()
        ratio = metric_value(m, "ingest_replay_progress_ratio", **lab)
        assert 0 < ratio < 1
        assert metric_value(m, "ingest_replay_estimate_records", **lab) == drops
        assert metric_value(m, "ingest_replay_rto_seconds", **lab) == 3
        assert metric_value(m, "ingest_replay_duration_seconds", **lab) > 0
        assert 0 < metric_value(m, "ingest_replay_eta_seconds", **lab) < math.inf
        st = rjson(root, "status", plan_id)
        c = st["completion"]
        assert st["state"] == "running" and 0 < c["ratio"] < 1 and c["rto_seconds"] == 3
        assert c["estimate_records"] == drops and c["eta_seconds"] > 0
        human = said(rctl(root, "status", plan_id))
        assert "%" in human and "eta" in human and "rto 3s" in human
        left = count(data / "state.db", "SELECT count(*) FROM dropped")
        assert 0 < left <= drops - 32  # the SIGSTOP landed mid-run
        proc.send_signal(signal.SIGKILL)  # replayctl dies: nothing moves the plan any more
        proc.wait(10)
        # the service re-reads the plan store every 5 s at most
        wait_for(lambda: metric_value(svc.metrics(), "ingest_replay_duration_seconds", **lab) > 3,
                 timeout=15, what="the killed replay's duration past its RTO on /metrics")
        m = svc.metrics()
        assert metric_value(m, "ingest_replay_state", state="running", **lab) == 1
        st = rjson(root, "status", plan_id)
        assert st["completion"]["rto_at_risk"] is True
        assert "AT RISK" in said(rctl(root, "status", plan_id))
        done = rjson(root, "run", "--plan", plan_id)  # resumes to the end
        assert done["state"] == "completed" and done["completion"]["ratio"] == 1.0
        wait_for(lambda: metric_value(svc.metrics(), "ingest_replay_state", state="completed",
                                      **lab) == 1, timeout=15, what="completed on /metrics")
        m = svc.metrics()
        assert metric_value(m, "ingest_replay_progress_ratio", **lab) == 1
        assert metric_value(m, "ingest_replay_records_total", outcome="delivered", **lab) == drops
    finally:
        if proc.poll() is None:
            proc.kill()
        svc.stop()


def test_errors_say_what_to_do(root: Path, tmp_path: Path) -> None:
    r = rctl(root, "status", "rp-0000beef")
    assert r.returncode == 2
    assert "no plan rp-0000beef; `replayctl list --tenant <tenant>` shows them" in said(r)
    r = rctl(root, "plan", "--tenant", TENANT, "--from", WINDOW[0], "--to", WINDOW[1],
             "--sources", "s3,bogus")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # the sources this config can replay for the tenant, not every kind there is
    assert "no s3 source for tenant 'acme-corp' in the config (valid sources: " \
           "inbox-dropped)" in said(r)
    r = rctl(root, "plan", "--tenant", TENANT, "--from", WINDOW[1], "--to", WINDOW[0],
             "--sources", "inbox-dropped")
    assert r.returncode == 2 and "must be before --to" in said(r)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    r = rctl(empty, "list")
    assert r.returncode == 3 and "sqlite state store at" in said(r)
    assert not (empty / "data").exists()
    cfg = tmp_path / "prod.yaml"
    cfg.write_text("state:\n  kind: production\n  redis_url: redis://127.0.0.1:1/0\n"
                   "  postgres_url: postgresql://u:p@127.0.0.1:1/db\n")
    r = rctl(root, "list", "--config", str(cfg))
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "postgres store at postgresql://127.0.0.1:1/db is unreachable" in said(r)


# ----------------------------------------------------------------------------- S3


async def _upload(endpoint: str, prefix: str, objects: dict[str, bytes]) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", endpoint_url=endpoint,
                                           region_name="us-east-1") as s3:
        for key, body in objects.items():
            await s3.put_object(Bucket=require_env("INGEST_TEST_S3_BUCKET", "seaweedfs"),
                                Key=prefix + key, Body=body)


async def _create_state(path: Path) -> None:
    from ingest.state.sqlite import SQLiteDB

    await (await SQLiteDB.open(path)).close()


def _s3_setup(root: Path, url: str, endpoint: str, extra: str = "") -> dict[str, str]:
    """An embedded state store and a config with one S3 source; the env that selects it."""
    asyncio.run(_create_state(root / "data" / "state.db"))
    cfg = root / "s3.yaml"
    cfg.write_text(
        "sources:\n  - type: s3\n    name: s3-main\n    tenant: acme-corp\n"
        f"    url: {url}\n    endpoint_url: {endpoint}\n    region: us-east-1\n" + extra)
    return {"INGEST_CONFIG": str(cfg)}


def test_s3_window_replayed_into_sqlite_sink(tmp_path: Path) -> None:
    endpoint = require_env("INGEST_TEST_S3_ENDPOINT", "seaweedfs")
    bucket = require_env("INGEST_TEST_S3_BUCKET", "seaweedfs")
    prefix = f"replayctl-{uuid.uuid4().hex[:8]}/"
    objects = {f"obj-{k}.jsonl": "".join(json.dumps(v3(f"s3-{k}-{i}", "normal")) + "\n"
                                         for i in range(40)).encode() for k in range(3)}
    asyncio.run(_upload(endpoint, prefix, objects))
    env = _s3_setup(tmp_path, f"s3://{bucket}/{prefix}", endpoint)
    now = time.time()
    p = rjson(tmp_path, "plan", "--tenant", TENANT, "--from", iso(now - 3600), "--to",
              iso(now + 3600), "--sources", "s3", "--throttle", "1000", env=env)
    src = p["sources"][0]
    assert (src["name"], src["estimate_objects"]) == ("s3-main", 3)
    assert src["estimate_bytes"] == sum(len(b) for b in objects.values())
    assert p["estimate_records"] is None  # objects are counted, records are not
    r = rctl(tmp_path, "approve", p["id"], "--as", "bob", env=env)
    assert r.returncode == 2 and "of unknown size" in said(r)
    rjson(tmp_path, "approve", p["id"], "--as", "bob", "--rfa", "RFA-42", env=env)
    done = rjson(tmp_path, "run", "--plan", p["id"], env=env)
    prog = done["progress"]["s3-main"]
    assert done["state"] == "completed" and prog["delivered"] == 120 and prog["dlq"] == 0
    assert [i.split("#")[0] for i in prog["items_done"]] == [prefix + k for k in objects]
    ids = sink_ids(tmp_path / "data")
    assert len(ids) == len(set(ids)) == 120
    assert count(tmp_path / "data" / "state.db",
                 "SELECT count(*) FROM checkpoints") == 0  # live progress untouched

    # an empty window elsewhere in time: nothing to read, approved without an RFA
    q = rjson(tmp_path, "plan", "--tenant", TENANT, "--from", "2020-01-01T00:00:00Z", "--to",
              "2020-01-02T00:00:00Z", "--sources", "s3-main", env=env)
    assert q["estimate_records"] == 0 and q["sources"][0]["estimate_objects"] == 0


def test_run_against_unreachable_s3_exits_3_and_the_plan_says_why(tmp_path: Path) -> None:
    """docs/replay.md: exit 3 when a source is unreachable; the plan says why and stays
    resumable. The endpoint is a port nobody listens on (no S3 server needed)."""
    env = _s3_setup(tmp_path, "s3://nowhere/x/", f"http://127.0.0.1:{free_port()}",
                    "    access_key_id: k\n    secret_access_key: s\n")
    now = time.time()
    p = rjson(tmp_path, "plan", "--tenant", TENANT, "--from", iso(now - 3600), "--to",
              iso(now + 3600), "--sources", "s3", env=env)
    assert "could not list" in p["sources"][0]["note"]
    rjson(tmp_path, "approve", p["id"], "--as", "bob", "--rfa", "RFA-7", env=env)
    r = rctl(tmp_path, "run", "--plan", p["id"], env=env)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "unreachable" in said(r) and f"plan {p['id']} failed" in said(r)
    st = rjson(tmp_path, "status", p["id"], env=env)
    assert st["state"] == "failed" and "CONNECTION_ERROR" in st["last_error"]


# ----------------------------------------------------------------------------- Postgres


async def _schema(url: str, schema: str, drop: bool = False) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(url)
    try:
        stmt = f"DROP SCHEMA {schema} CASCADE" if drop else f"CREATE SCHEMA {schema}"
        await conn.execute(stmt)
    finally:
        await conn.close()


def test_plan_approve_status_on_postgres(tmp_path: Path) -> None:
    pg = require_env("INGEST_TEST_POSTGRES_URL", "postgres")
    redis = require_env("INGEST_TEST_REDIS_URL", "redis").rsplit("/", 1)[0] + "/13"
    schema = f"replayctl_{uuid.uuid4().hex[:8]}"
    asyncio.run(_schema(pg, schema))
    try:
        sep = "&" if "?" in pg else "?"
        cfg = tmp_path / "prod.yaml"
        cfg.write_text("state:\n  kind: production\n"
                       f"  redis_url: {redis}\n  postgres_url: {pg}{sep}search_path={schema}\n")
        c = ("--config", str(cfg))
        p = rjson(tmp_path, "plan", "--tenant", TENANT, "--from", "2025-01-01T00:00:00Z",
                  "--to", "2025-01-02T00:00:00Z", "--sources", "inbox-dropped", "--throttle",
                  "100", *c)
        assert p["state"] == "pending_approval" and p["estimate_records"] == 0
        a = rjson(tmp_path, "approve", p["id"], "--as", "bob", "--rfa", "RFA-1234", *c)
        assert (a["state"], a["approved_by"], a["rfa"]) == ("approved", "bob", "RFA-1234")
        st = rjson(tmp_path, "status", p["id"], *c)
        assert st == {**a, "legal_hold": "no legal-hold service configured"}
        r = rctl(tmp_path, "approve", p["id"], "--as", "bob", *c)
        assert r.returncode == 2 and "already approved" in said(r)
        assert [x["id"] for x in rjson(tmp_path, "list", "--tenant", TENANT, *c)] == [p["id"]]
        r = rctl(tmp_path, "status", "rp-deadbeef", *c)
        assert r.returncode == 2 and "no plan rp-deadbeef" in said(r)
    finally:
        asyncio.run(_schema(pg, schema, drop=True))
