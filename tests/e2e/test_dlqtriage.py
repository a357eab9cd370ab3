"""`dlqtriage` as operators run it: a process against the SQLite store the real service wrote.

The service (`ingest run`, embedded) is fed drift (`amount` as a string), validation failures
and older revisions once per module; every test works on its own copy of that data dir and runs
the runbook's commands as written, from the directory holding `data/`. The CONNECTION_ERROR
test cuts a TCP proxy in front of the test Postgres, so the sink failures are real.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import require_env, wait_for
from tests.e2e._service import ServiceProcess

pytestmark = pytest.mark.e2e
TENANT = "acme-corp"
DLQTRIAGE = str(Path(sys.executable).parent / "dlqtriage")


def v3(entity_id: str, revision: int, **attrs: Any) -> dict[str, Any]:
    return {"schema_version": 3, "tenant_id": TENANT, "entity_type": "order",
            "entity_id": entity_id, "revision": revision,
            "occurred_at": "2025-01-01T00:00:00Z", "attributes": attrs or {"amount": 1.0}}


def feed(data: Path, records: list[dict[str, Any]], name: str = "orders.jsonl") -> None:
    inbox = data / "inbox" / TENANT
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(inbox / name)


def dlq_count(data: Path, where: str = "1") -> int:
    with sqlite3.connect(data / "state.db", timeout=10) as db:
        return int(db.execute(f"SELECT count(*) FROM dlq WHERE {where}").fetchone()[0])


def dlqt(cwd: Path, *args: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("INGEST_DATA_DIR", "INGEST_CONFIG")}
    return subprocess.run([DLQTRIAGE, *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def said(r: subprocess.CompletedProcess[str]) -> str:
    """stdout + stderr with rich's line wrapping undone."""
    return " ".join((r.stdout + r.stderr).split())


def dlqt_json(cwd: Path, *args: str, env: dict[str, str] | None = None, code: int = 0) -> Any:
    r = dlqt(cwd, *args, "--json", env=env)
    assert r.returncode == code, r.stdout + r.stderr
    return json.loads(r.stdout)


# ------------------------------------------------------------------------ the fed service

DRIFT = [v3(f"d-{i}", 1, amount=f"{i}.50", currency="EUR") for i in range(6)]
INVALID = [v3(f"v-{i}", 1, amount=-1.0 - i) for i in range(3)]
VALID = [v3(f"o-{i}", 1, amount=float(i), currency="EUR") for i in range(40)]
OLDER = [v3("x-1", 5), v3("x-1", 3), v3("x-2", 4), v3("x-2", 2)]
FEED = VALID + DRIFT + INVALID + OLDER


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/data as the embedded service left it after the mixed feed (then stopped)."""
    root = tmp_path_factory.mktemp("fed")
    svc = ServiceProcess(root / "data").start()
    try:
        feed(svc.data_dir, FEED)
        wait_for(lambda: dlq_count(svc.data_dir) == 11, what="11 DLQ entries")
        assert svc.terminate() == 0
    finally:
        svc.stop()
    # Close every connection this process still holds (the last close folds the -wal file
    # into the database and deletes it): copying a live -wal while a collected connection
    # deletes it failed CI with FileNotFoundError.
    gc.collect()
    for db in ("state.db", "sink.db"):
        if (root / "data" / db).exists():
            with contextlib.closing(sqlite3.connect(root / "data" / db)) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return root


@pytest.fixture()
def root(fed: Path, tmp_path: Path) -> Path:
    shutil.copytree(fed / "data", tmp_path / "data", ignore=shutil.ignore_patterns("*.log"))
    return tmp_path


def test_runbook_commands_as_written(root: Path) -> None:
    r = dlqt(root, "summary", "--tenant", TENANT)
    assert r.returncode == 0, r.stderr
    assert "SCHEMA_DRIFT" in r.stdout and "OVER" in r.stdout and "0.5% SLO" in r.stdout
    s = dlqt_json(root, "summary", "--tenant", TENANT)
    assert {k: v["count"] for k, v in s["by_reason"].items()} == {
        "SCHEMA_DRIFT": 6, "VALIDATION_FAIL": 3, "OLDER_REVISION": 2}
    assert s["by_reason"]["SCHEMA_DRIFT"]["retryable"] is False
    assert s["processed"] == len(FEED) and s["slo"] == "over"
    assert s["dlq_rate"] == pytest.approx(11 / len(FEED))
    assert s["by_sink"] == {"-": 9, "sqlite": 2} and s["by_source"] == {"inbox": 11}
    assert dlqt_json(root, "summary", "--tenant", "nobody")["total"] == 0

    r = dlqt(root, "sample", "--reason", "SCHEMA_DRIFT", "--limit", "5")
    assert r.returncode == 0 and r.stdout.count("SCHEMA_DRIFT") == 5, r.stdout
    assert "$.attributes.amount" in r.stdout
    sample = dlqt_json(root, "sample", "--reason", "SCHEMA_DRIFT", "--limit", "5")
    assert len(sample) == 5 and {e["entity_id"] for e in sample} <= {d["entity_id"] for d in DRIFT}
    assert sample[0]["error"]["path"] == "$.attributes.amount"
    assert sample[0]["error"]["found"] == "string" and sample[0]["error"]["expected"] == "number"
    assert sample[0]["attempts"] == 1 and "payload" not in sample[0]
    older = dlqt_json(root, "sample", "--reason", "older_revision")
    assert {e["error"]["stored_revision"] for e in older} == {5, 4}

    r = dlqt(root, "analyze", "--tenant", TENANT)
    assert r.returncode == 0, r.stderr
    flat = " ".join(r.stdout.split())
    assert "attribute `amount` arrived as string instead of number since" in flat
    assert "safe to purge after review" in flat
    found = dlqt_json(root, "analyze", "--tenant", TENANT)["patterns"]
    drift = next(p for p in found if p["reason"] == "SCHEMA_DRIFT")
    assert drift["count"] == 6 and drift["sources"] == ["inbox"]
    assert drift["signature"] == "$.attributes.amount type string->number"
    assert "ingest/transformers/" in drift["suggestion"] and "from source `inbox`" in drift[
        "suggestion"]
    invalid = next(p for p in found if p["reason"] == "VALIDATION_FAIL")
    assert invalid["count"] == 3 and "minimum" in invalid["signature"]

    r = dlqt(root, "redrive", "--tenant", TENANT, "--reason", "CONNECTION_ERROR")
    assert r.returncode == 0 and "0 entries" in r.stdout, r.stdout + r.stderr
    r = dlqt(root, "purge", "--older-than", "7", "--reason", "OLDER_REVISION")
    assert r.returncode == 0 and dlq_count(root / "data") == 11, r.stdout + r.stderr

    r = dlqt(root, "sample", "--reason", "SCHEMA_DRIFT", "--full")
    assert r.returncode == 0
    assert '"amount": "0.50"' in r.stdout and '"currency": "EUR"' in r.stdout  # pretty JSON

    # INGEST_DATA_DIR instead of the working directory
    s2 = dlqt_json(Path("/"), "summary", env={"INGEST_DATA_DIR": str(root / "data")})
    assert s2["total"] == 11



def test_tenant_is_checked_by_every_command(root: Path) -> None:
    """`--tenant` took any text: '' selected every tenant (a redrive or purge of all of them)
    and a typo answered "redrive: 0 entries", exit 0, in silence. Now a name outside the tenant
    rule is exit 2 for every command, as replayctl and `ingest auth` answer, and a redrive or
    purge for a tenant the store never saw warns naming it (exit 0: a tenant with no data yet
    is not an error); a known tenant with nothing that matches is "nothing to do", exit 0."""
    before = dlq_count(root / "data")
    commands = [
        ["redrive", "--reason", "SCHEMA_DRIFT", "--force"],
        ["purge", "--older-than", "0", "--yes"],
        ["summary"], ["sample"], ["analyze"],
    ]  # fmt: skip
    for cmd in commands:
        r = dlqt(root, *cmd, "--tenant", "")
        assert r.returncode == 2, said(r)
        assert "--tenant '' is not a valid tenant name" in said(r), said(r)
        assert "Traceback" not in said(r)
    for bad in ("Acme-Corp", "acme corp", "../acme"):
        r = dlqt(root, "redrive", "--tenant", bad, "--reason", "SCHEMA_DRIFT", "--dry-run")
        assert r.returncode == 2 and "is not a valid tenant name" in said(r), said(r)
    for cmd in (commands[0], [*commands[0], "--dry-run"], commands[1]):
        r = dlqt(root, *cmd, "--tenant", "acme-crop")
        assert r.returncode == 0, said(r)  # nothing to do, but the name is probably a typo
        assert "no DLQ entry and no processed record for tenant 'acme-crop'" in said(r), said(r)
    assert dlq_count(root / "data") == before  # nothing was redriven or purged
    r = dlqt(root, "redrive", "--tenant", TENANT, "--reason", "CONNECTION_ERROR")
    assert r.returncode == 0 and "redrive: 0 entries" in said(r), said(r)
    assert dlqt_json(root, "summary", "--tenant", "nobody")["total"] == 0  # a view: 0, exit 0


def test_errors_say_what_to_do(root: Path, tmp_path: Path) -> None:
    r = dlqt(root, "sample", "--reason", "SCHEMA_DRIFTT")
    assert r.returncode == 2 and "unknown reason code 'SCHEMA_DRIFTT'" in said(r)
    assert "CIRCUIT_OPEN" in r.stderr and "Traceback" not in r.stderr
    r = dlqt(root, "redrive", "--tenant", TENANT, "--reason", "SCHEMA_DRIFT")
    assert r.returncode == 2 and "fix the transformer/schema first, then --force" in said(r)
    assert dlq_count(root / "data") == 11
    r = dlqt(root, "redrive", "--tenant", TENANT)
    assert r.returncode == 2 and "--reason" in said(r)

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    r = dlqt(empty, "summary")
    assert r.returncode == 3 and "sqlite state store at" in said(r) and "Traceback" not in r.stderr
    assert not (empty / "data").exists()  # never creates an empty store

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "prod.yaml"
    cfg.write_text("state:\n  kind: production\n  redis_url: redis://127.0.0.1:1/0\n"
                   f"  postgres_url: postgresql://u:p@127.0.0.1:{port}/db\n")
    r = dlqt(root, "summary", "--config", str(cfg))
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert f"postgres store at postgresql://127.0.0.1:{port}/db is unreachable" in said(r)

    bad = tmp_path / "bad.yaml"
    bad.write_text("transformers: ['no_such_module_xyz:fix']\n")
    r = dlqt(root, "redrive", "--reason", "CONNECTION_ERROR", "--config", str(bad))
    assert r.returncode == 2 and "transformers[0]" in said(r) and "Traceback" not in r.stderr


FIX = '''
def amount_to_number(body):
    attrs = body.get("attributes")
    if isinstance(attrs, dict) and isinstance(attrs.get("amount"), str):
        attrs["amount"] = float(attrs["amount"])
    return body
'''


def test_redrive_after_transformer_fix_delivers_drifted_records(root: Path,
                                                               tmp_path: Path) -> None:
    data = root / "data"
    # without the fix: every entry fails again on its own row, attempts go up, nothing doubles
    out = dlqt_json(root, "redrive", "--tenant", TENANT, "--reason", "SCHEMA_DRIFT", "--force",
                    code=1)
    assert out["delivered"] == 0 and out["failed"] == 6
    with sqlite3.connect(data / "state.db") as db:
        rows = db.execute("SELECT attempts FROM dlq WHERE reason = 'SCHEMA_DRIFT'").fetchall()
    assert sorted(rows) == [(2,)] * 6

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "fixmod.py").write_text(FIX)
    cfg = root / "fix.yaml"
    cfg.write_text("transformers: ['fixmod:amount_to_number']\n")
    env = {"PYTHONPATH": str(plugins)}
    dry = dlqt_json(root, "redrive", "--tenant", TENANT, "--reason", "SCHEMA_DRIFT",
                    "--dry-run", "--config", str(cfg), env=env)
    assert dry["count"] == 6 and dlq_count(data) == 11
    out = dlqt_json(root, "redrive", "--tenant", TENANT, "--reason", "SCHEMA_DRIFT", "--force",
                    "--config", str(cfg), env=env)
    assert out == {**out, "selected": 6, "delivered": 6, "failed": 0}

    with sqlite3.connect(data / "sink.db") as sink:
        got = dict(sink.execute(
            "SELECT entity_id, json_extract(attributes, '$.amount') FROM entities"
            " WHERE entity_id LIKE 'd-%'"))
    assert got == {f"d-{i}": float(f"{i}.50") for i in range(6)}
    with sqlite3.connect(data / "state.db") as db:
        left = Counter(r for (r,) in db.execute("SELECT reason FROM dlq"))
    assert left == {"VALIDATION_FAIL": 3, "OLDER_REVISION": 2}
    # a second run finds nothing: exit 0, zero entries
    assert dlqt_json(root, "redrive", "--reason", "SCHEMA_DRIFT", "--force", "--config",
                     str(cfg), env=env)["selected"] == 0


def test_purge_removes_exactly_what_its_dry_run_listed(root: Path) -> None:
    data = root / "data"
    ten_days = 10 * 86400
    with sqlite3.connect(data / "state.db") as db:  # age some entries as if from last week
        db.execute("UPDATE dlq SET first_failed_at = first_failed_at - ?"
                   " WHERE reason = 'OLDER_REVISION' OR entity_id = 'v-0'", (ten_days,))
        older_ids = sorted(i for (i,) in db.execute(
            "SELECT id FROM dlq WHERE reason = 'OLDER_REVISION'"))
    dry = dlqt_json(root, "purge", "--older-than", "7", "--reason", "OLDER_REVISION",
                    "--dry-run")
    assert dry["count"] == 2 and sorted(dry["ids"]) == older_ids
    r = dlqt(root, "purge", "--older-than", "7", "--reason", "OLDER_REVISION")
    assert r.returncode == 2 and "pass --yes" in said(r) and dlq_count(data) == 11
    done = dlqt_json(root, "purge", "--older-than", "7", "--reason", "OLDER_REVISION", "--yes")
    assert sorted(done["ids"]) == older_ids and done["deleted"] == 2
    assert dlq_count(data) == 9 and dlq_count(data, "reason = 'OLDER_REVISION'") == 0
    assert dlq_count(data, "entity_id = 'v-0'") == 1  # aged but another reason: kept


# ------------------------------------------------------- CONNECTION_ERROR, for real


class CuttableProxy:
    """A TCP forwarder to Postgres; `cut()` closes it and every connection through it."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.cutting = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cutting:
            try:
                client, _ = self.listener.accept()
                if self.cutting:
                    client.close()
                    return
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while chunk := a.recv(65536):
                b.sendall(chunk)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.cutting = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self.listener.close()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def _pg(url: str) -> tuple[str, str, int, str]:
    """(schema, dsn with that search_path, host, port) for a fresh schema."""
    import asyncio

    import asyncpg  # type: ignore[import-untyped]

    schema = f"dlqt_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(url)
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.close()

    asyncio.run(create())
    parts = urlsplit(url)
    return schema, f"{url}?search_path={schema}", parts.hostname or "", parts.port or 5432


def _pg_rows(url: str, schema: str) -> dict[str, int]:
    import asyncio

    import asyncpg

    async def read() -> dict[str, int]:
        conn = await asyncpg.connect(url)
        rows = await conn.fetch(f"SELECT entity_id, revision FROM {schema}.entities")
        await conn.close()
        return {r["entity_id"]: r["revision"] for r in rows}

    return asyncio.run(read())


SINKS_YAML = """retry: {{max_attempts: 2, max_total_seconds: 1, base_delay_seconds: 0.05}}
breaker: {{failure_threshold: 100}}
sinks:
  - {{type: sqlite, name: sqlite}}
  - {{type: postgres, name: pg, dsn: "{dsn}"}}
"""


@pytest.fixture()
def pg_url() -> str:
    return require_env("INGEST_TEST_POSTGRES_URL", "postgres")


def test_connection_error_redrive_survives_interrupts(tmp_path: Path, pg_url: str) -> None:
    n = 4000
    schema, dsn, host, port = _pg(pg_url)
    proxy = CuttableProxy(host, port)
    cut_dsn = dsn.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
    (tmp_path / "service.yaml").write_text(SINKS_YAML.format(dsn=cut_dsn))
    data = tmp_path / "data"
    svc = ServiceProcess(data, config=tmp_path / "service.yaml").start()
    try:
        proxy.cut()  # the Postgres sink's network goes away under the running service
        feed(data, [v3(f"c-{i}", 1 + i % 3) for i in range(n)])
        wait_for(lambda: dlq_count(data, "sink = 'pg'") == n, 90, f"{n} pg DLQ entries")
    finally:
        svc.stop()
    reasons = Counter(r for (r,) in sqlite3.connect(data / "state.db").execute(
        "SELECT reason FROM dlq"))
    assert reasons == {"CONNECTION_ERROR": n}
    assert dlqt_json(tmp_path, "summary", "--tenant", TENANT)["by_sink"] == {"pg": n}

    # the sink is still down: redrive refuses at once with exit 3 (docs/dlqtriage.md) and
    # nothing leaves the DLQ
    r = dlqt(tmp_path, "redrive", "--tenant", TENANT, "--reason", "CONNECTION_ERROR",
             "--config", "service.yaml")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "sink unreachable, nothing was redriven (pg:" in said(r)
    assert "Traceback" not in r.stderr
    assert dlq_count(data) == n

    # the sink is back (the config points at the real server): redrive, interrupted twice
    (tmp_path / "ingest.yaml").write_text(SINKS_YAML.format(dsn=dsn))
    args = [DLQTRIAGE, "redrive", "--tenant", TENANT, "--reason", "CONNECTION_ERROR",
            "--page-size", "20", "--config", "ingest.yaml"]
    for sig, code in ((signal.SIGINT, 130), (signal.SIGKILL, -9)):
        before = dlq_count(data)
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_for(lambda b=before: dlq_count(data) <= b - 200, 60, "redrive progress")  # type: ignore[misc]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, out + err
        left = dlq_count(data)
        assert 0 < left < before, (sig, left)
        if sig == signal.SIGINT:
            assert "interrupted" in out and "Traceback" not in err
    r = dlqt(tmp_path, "redrive", "--tenant", TENANT, "--reason", "CONNECTION_ERROR",
             "--config", "ingest.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert dlq_count(data) == 0
    rows = _pg_rows(pg_url, schema)
    assert rows == {f"c-{i}": 1 + i % 3 for i in range(n)}
