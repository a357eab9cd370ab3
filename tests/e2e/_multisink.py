"""Multi-sink e2e helpers: the service in production mode routing to Postgres, Neo4j, Typesense.

- `neo4j_env()` / `typesense_env()`: coordinates of the shared servers (environment first, then
  `$INGEST_RUN_DIR/{neo4j,typesense}.env`, as `scripts/services/up.sh` writes them).
- `private_typesense()`: a Typesense of our own (scripts/services/typesense.sh under a temporary
  INGEST_RUN_DIR, free API and peering ports), so `stop-server` / `start-server` in an outage
  test disturbs nobody.
- `write_multisink_config(...)`: a production config (state on Redis + Postgres) with any of
  the three sinks and explicit routes.
- `pg_state` / `neo4j_state` / `typesense_state`: what each sink holds, in one shape —
  {(entity_type, entity_id): (revision, deleted)} — so tests compare sinks entity by entity.
- `dlq_rows(dsn)`: (sink, reason, entity_type, entity_id, revision) of every DLQ entry.
- `dlqtriage(...)`: the real CLI as a process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
from neo4j import GraphDatabase

from tests.conftest import v3_body
from tests.e2e._production import (
    RUN_DIR,
    SCRIPTS,
    PrivateServer,
    _env_file,
    dump_config,
    pg_query,
)
from tests.e2e._service import free_port

DLQTRIAGE = str(Path(sys.executable).parent / "dlqtriage")
State = dict[tuple[str, str], tuple[int, bool]]

TYPESENSE_FIELDS: dict[str, list[dict[str, Any]]] = {
    "order": [
        {"name": "amount", "type": "float"},
        {"name": "status", "type": "string", "facet": True},
    ],
}


def _coords(env_file: str, keys: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    if (RUN_DIR / env_file).exists():
        out.update(_env_file(RUN_DIR / env_file))
    out.update({k: v for k, v in os.environ.items() if k in keys})
    missing = [k for k in keys if not out.get(k)]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not set: run `scripts/services/up.sh "
            f"{env_file.removesuffix('.env')}` and source $INGEST_RUN_DIR/{env_file}"
        )
    return {k: out[k] for k in keys}


def neo4j_env() -> dict[str, str]:
    """{uri, user, password} of the Neo4j under test."""
    c = _coords(
        "neo4j.env",
        ("INGEST_TEST_NEO4J_URI", "INGEST_TEST_NEO4J_USER", "INGEST_TEST_NEO4J_PASSWORD"),
    )
    return {
        "uri": c["INGEST_TEST_NEO4J_URI"],
        "user": c["INGEST_TEST_NEO4J_USER"],
        "password": c["INGEST_TEST_NEO4J_PASSWORD"],
    }


def typesense_env() -> dict[str, str]:
    """{url, api_key} of the shared Typesense."""
    c = _coords("typesense.env", ("INGEST_TEST_TYPESENSE_URL", "INGEST_TEST_TYPESENSE_API_KEY"))
    return {"url": c["INGEST_TEST_TYPESENSE_URL"], "api_key": c["INGEST_TEST_TYPESENSE_API_KEY"]}


def private_typesense() -> PrivateServer:
    """A Typesense of our own; `.env` drives typesense.sh, `.url` and `.api_key` reach it."""
    run_dir = Path(tempfile.mkdtemp(prefix="ingest-e2e-typesense-"))
    port = free_port()
    env = {
        **os.environ,
        "INGEST_RUN_DIR": str(run_dir),
        "INGEST_TEST_TYPESENSE_PORT": str(port),
        "INGEST_TEST_TYPESENSE_PEERING_PORT": str(free_port()),
    }
    server = PrivateServer("typesense", run_dir, port, "", env)
    try:
        server.run("start", timeout=180)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    values = _env_file(run_dir / "typesense.env")
    server.url = values["INGEST_TEST_TYPESENSE_URL"]
    server.env["INGEST_TEST_TYPESENSE_API_KEY"] = values["INGEST_TEST_TYPESENSE_API_KEY"]
    return server


def new_tenant(prefix: str = "acme-corp") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------- config
def write_multisink_config(
    path: Path,
    *,
    redis_url: str,
    postgres_url: str,
    table: str = "entities",
    sinks: Sequence[str] = ("postgres", "neo4j", "typesense"),
    routes: Sequence[dict[str, Any]] = (),
    neo4j: dict[str, str] | None = None,
    typesense: dict[str, str] | None = None,
    retry: dict[str, Any] | None = None,
    breaker: dict[str, Any] | None = None,
    sources: Sequence[dict[str, Any]] | None = None,
    batch_size: int = 2000,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Production config: Redis + Postgres state; sinks by name; routes as given."""
    sink_cfgs: list[dict[str, Any]] = []
    for name in sinks:
        if name == "postgres":
            sink_cfgs.append({"type": "postgres", "name": "postgres", "table": table})
        elif name == "neo4j":
            assert neo4j is not None, "neo4j coordinates needed"
            sink_cfgs.append({"type": "neo4j", "name": "neo4j", **neo4j})
        elif name == "typesense":
            assert typesense is not None, "typesense coordinates needed"
            sink_cfgs.append(
                {
                    "type": "typesense",
                    "name": "typesense",
                    **typesense,
                    "fields": TYPESENSE_FIELDS,
                    "timeout_seconds": 5.0,
                }
            )
        else:
            raise ValueError(name)
    raw: dict[str, Any] = {
        "state": {"kind": "production", "redis_url": redis_url, "postgres_url": postgres_url},
        "sinks": sink_cfgs,
        "sources": list(sources)
        if sources is not None
        else [{"type": "inbox", "name": "inbox", "poll_seconds": 0.2, "batch_size": batch_size}],
        "routes": list(routes),
    }
    return dump_config(path, raw, retry=retry, breaker=breaker, extra=extra)


# ---------------------------------------------------------------------- records and feeds
def v3(
    tenant: str,
    entity_type: str,
    entity_id: str,
    revision: int,
    *,
    deleted: bool = False,
    relations: Iterable[tuple[str, str, str]] = (),
    **attrs: Any,
) -> dict[str, Any]:
    attributes = {} if deleted else (attrs or {"amount": float(revision), "status": "new"})
    body = v3_body(tenant, entity_type, entity_id, revision, attributes=attributes,
                   relations=relations)
    if deleted:
        body["deleted"] = True
    return body


def drop(inbox: Path, tenant: str, name: str, records: Sequence[dict[str, Any]]) -> Path:
    """Write elsewhere, rename into <inbox>/<tenant>/: taken whole, never half-written."""
    d = inbox / tenant
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return Path(tmp.rename(d / name))


def pending_files(inbox: Path, tenant: str) -> list[str]:
    d = inbox / tenant
    return sorted(p.name for p in d.iterdir() if p.is_file() and not p.name.startswith("."))


# ---------------------------------------------------------------------- sink state
def pg_state(dsn: str, tenant: str, table: str = "entities") -> State:
    rows = pg_query(
        dsn,
        f"SELECT entity_type, entity_id, revision, deleted FROM {table} WHERE tenant = '{tenant}'",
    )
    return {(et, eid): (int(rev), bool(d)) for et, eid, rev, d in rows}


def neo4j_state(coords: dict[str, str], tenant: str) -> State:
    """Entities with a revision, and tombstones (an entity at a tombstone's revision or below
    counts as deleted at the tombstone's revision)."""
    with GraphDatabase.driver(coords["uri"], auth=(coords["user"], coords["password"])) as drv:
        live, _, _ = drv.execute_query(
            "MATCH (n:Entity {tenant: $t}) WHERE n.revision IS NOT NULL "
            "RETURN n.entity_type AS et, n.entity_id AS id, n.revision AS r",
            t=tenant,
        )
        tombs, _, _ = drv.execute_query(
            "MATCH (n:Tombstone {tenant: $t}) "
            "RETURN n.entity_type AS et, n.entity_id AS id, n.revision AS r",
            t=tenant,
        )
    out: State = {(r["et"], r["id"]): (int(r["r"]), True) for r in tombs}
    for r in live:
        key = (r["et"], r["id"])
        if key not in out or int(r["r"]) > out[key][0]:
            out[key] = (int(r["r"]), False)
    return out


def neo4j_counts(coords: dict[str, str], tenant: str) -> tuple[int, int]:
    """(live entity nodes, tombstones) of a tenant."""
    with GraphDatabase.driver(coords["uri"], auth=(coords["user"], coords["password"])) as drv:
        rows, _, _ = drv.execute_query(
            "CALL () { MATCH (n:Entity {tenant: $t}) WHERE n.revision IS NOT NULL "
            "RETURN count(n) AS live } "
            "CALL () { MATCH (n:Tombstone {tenant: $t}) RETURN count(n) AS tombs } "
            "RETURN live, tombs",
            t=tenant,
        )
    return int(rows[0]["live"]), int(rows[0]["tombs"])


def neo4j_cleanup(coords: dict[str, str], tenant: str) -> None:
    with GraphDatabase.driver(coords["uri"], auth=(coords["user"], coords["password"])) as drv:
        drv.execute_query(
            "MATCH (n) WHERE (n:Entity OR n:Tombstone) AND n.tenant = $t DETACH DELETE n", t=tenant
        )


def _ts(coords: dict[str, str]) -> httpx.Client:
    return httpx.Client(
        base_url=coords["url"], timeout=10, headers={"X-TYPESENSE-API-KEY": coords["api_key"]}
    )


def typesense_collections(coords: dict[str, str], tenant: str) -> list[str]:
    with _ts(coords) as http:
        resp = http.get("/collections")
        resp.raise_for_status()
        return sorted(c["name"] for c in resp.json() if c["name"].startswith(f"{tenant}__"))


def typesense_state(coords: dict[str, str], tenant: str) -> State:
    """Every document of every collection of the tenant (`<tenant>__<entity_type>`)."""
    out: State = {}
    with _ts(coords) as http:
        for coll in typesense_collections(coords, tenant):
            etype = coll.split("__", 1)[1]
            resp = http.get(
                f"/collections/{coll}/documents/export",
                params={"include_fields": "id,revision,deleted"},
            )
            resp.raise_for_status()
            for line in resp.text.splitlines():
                if line:
                    doc = json.loads(line)
                    out[(etype, doc["id"])] = (int(doc["revision"]), bool(doc["deleted"]))
    return out


def typesense_cleanup(coords: dict[str, str], tenant: str) -> None:
    with _ts(coords) as http:
        for coll in typesense_collections(coords, tenant):
            http.delete(f"/collections/{coll}")


# ---------------------------------------------------------------------- DLQ and CLI
def dlq_rows(dsn: str) -> list[tuple[str, str, str, str, int]]:
    """(sink, reason, entity_type, entity_id, revision) of every DLQ entry, sorted."""
    rows = pg_query(
        dsn,
        "SELECT coalesce(sink, '-'), reason, coalesce(entity_type, ''), "
        "coalesce(entity_id, ''), coalesce(revision, -1) FROM dlq",
    )
    return sorted((str(s), str(r), str(et), str(eid), int(rev)) for s, r, et, eid, rev in rows)


def dlqtriage(config: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("INGEST_DATA_DIR", "INGEST_CONFIG")}
    return subprocess.run(
        [DLQTRIAGE, *args, "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=config.parent,
    )


__all__ = [
    "DLQTRIAGE",
    "SCRIPTS",
    "TYPESENSE_FIELDS",
    "State",
    "dlq_rows",
    "dlqtriage",
    "drop",
    "neo4j_cleanup",
    "neo4j_counts",
    "neo4j_env",
    "neo4j_state",
    "new_tenant",
    "pending_files",
    "pg_state",
    "private_typesense",
    "typesense_cleanup",
    "typesense_collections",
    "typesense_env",
    "typesense_state",
    "v3",
    "write_multisink_config",
]
