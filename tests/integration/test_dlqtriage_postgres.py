"""`dlqtriage` against the Postgres DLQ store: the service runs in production mode (Redis +
Postgres state, a fresh schema), then the runbook's commands run as processes on its config."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.e2e._service import ServiceProcess
from tests.e2e.test_dlqtriage import FIX, dlqt, dlqt_json, said, wait_for

pytestmark = pytest.mark.integration


def _sql(dsn: str, sql: str, *args: Any) -> Any:
    async def go() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


@pytest.fixture()
def prod(tmp_path: Path, pg_dsn: str, redis_url: str) -> Iterator[tuple[Path, str, str]]:
    """(working dir with ingest.yaml, tenant, dsn) after a mixed feed through the service."""
    tenant = f"acme-{uuid.uuid4().hex[:8]}"  # Redis is shared: keys of our own
    (tmp_path / "ingest.yaml").write_text(
        f"state:\n  kind: production\n  redis_url: '{redis_url}'\n  postgres_url: '{pg_dsn}'\n")
    svc = ServiceProcess(tmp_path / "data", config=tmp_path / "ingest.yaml")
    svc.start()

    def rec(eid: str, rev: int, amount: Any) -> str:
        return json.dumps({"schema_version": 3, "tenant_id": tenant, "entity_type": "order",
                           "entity_id": eid, "revision": rev,
                           "occurred_at": "2025-01-01T00:00:00Z",
                           "attributes": {"amount": amount}})

    lines = [rec(f"o-{i}", 1, float(i)) for i in range(20)]
    lines += [rec(f"d-{i}", 1, f"{i}.25") for i in range(4)]  # drift
    lines += [rec("x-1", 5, 1.0), rec("x-1", 2, 1.0)]  # older revision
    inbox = tmp_path / "data" / "inbox" / tenant
    inbox.mkdir(parents=True)
    (inbox / ".f.tmp").write_text("\n".join(lines) + "\n")
    (inbox / ".f.tmp").rename(inbox / "orders.jsonl")
    try:
        wait_for(lambda: len(_sql(pg_dsn, "SELECT id FROM dlq")) == 5, 60, "5 DLQ rows")
    finally:
        svc.stop()
    yield tmp_path, tenant, pg_dsn


def test_runbook_commands_on_postgres(prod: tuple[Path, str, str]) -> None:
    cwd, tenant, dsn = prod
    cfg = ("--config", "ingest.yaml")
    s = dlqt_json(cwd, "summary", "--tenant", tenant, *cfg)
    assert {k: v["count"] for k, v in s["by_reason"].items()} == {
        "SCHEMA_DRIFT": 4, "OLDER_REVISION": 1}
    assert s["processed"] == 26 and s["slo"] == "over"
    r = dlqt(cwd, "sample", "--reason", "SCHEMA_DRIFT", "--limit", "5", "--tenant", tenant, *cfg)
    assert r.returncode == 0 and "$.attributes.amount" in r.stdout
    found = dlqt_json(cwd, "analyze", "--tenant", tenant, *cfg)["patterns"]
    assert "attribute `amount` arrived as string instead of number" in found[0]["suggestion"]
    r = dlqt(cwd, "sample", "--reason", "SCHEMA_DRIFT", "--full", "--tenant", tenant, *cfg)
    assert '"amount": "0.25"' in r.stdout

    r = dlqt(cwd, "redrive", "--tenant", tenant, "--reason", "SCHEMA_DRIFT", *cfg)
    assert r.returncode == 2 and "then --force" in said(r)
    (cwd / "fixmod.py").write_text(FIX)
    (cwd / "fix.yaml").write_text((cwd / "ingest.yaml").read_text()
                                  + "transformers: ['fixmod:amount_to_number']\n")
    out = dlqt_json(cwd, "redrive", "--tenant", tenant, "--reason", "SCHEMA_DRIFT", "--force",
                    "--config", "fix.yaml", env={"PYTHONPATH": str(cwd)})
    assert (out["delivered"], out["failed"]) == (4, 0)
    assert [r["reason"] for r in _sql(dsn, "SELECT reason FROM dlq")] == ["OLDER_REVISION"]

    _sql(dsn, "UPDATE dlq SET first_failed_at = first_failed_at - interval '10 days'")
    dry = dlqt_json(cwd, "purge", "--older-than", "7", "--reason", "OLDER_REVISION", "--dry-run",
                    *cfg)
    done = dlqt_json(cwd, "purge", "--older-than", "7", "--reason", "OLDER_REVISION", "--yes",
                     *cfg)
    assert dry["count"] == 1 and done["ids"] == dry["ids"]
    assert _sql(dsn, "SELECT id FROM dlq") == []
