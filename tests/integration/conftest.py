"""Fixtures for the Redis and Postgres state and sink tests (real servers, no mocks).

Shared servers: `scripts/services/up.sh postgres redis`, then source the all.env it prints.
Each test gets its own Postgres schema (dropped afterwards) and its own Redis key prefix /
tenant. Tests that stop or restart a server start a private one with the same scripts under a
temporary INGEST_RUN_DIR, so other tests using the shared servers are not disturbed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg  # type: ignore[import-untyped]
import pytest
import redis.asyncio as aioredis

from ingest.records import DLQEntry, RawRecord, ReasonCode, Record, dedupe_key
from ingest.state.redis import redis_client
from tests.conftest import require_env, v3_body
from tests.e2e._production import _env_file
from tests.e2e._service import free_port
from tests.integration._fixtures_files import (  # noqa: F401 - fixtures for this folder
    prefix,
    s3,
    s3_endpoint,
    sftp_dir,
    sftp_server,
    state,
)
from tests.integration._fixtures_graph import (  # noqa: F401 - fixtures for this folder
    fresh_tenant,
    neo4j_coords,
    neo4j_driver,
    neo4j_sink,
    typesense_coords,
    typesense_sink,
)
from tests.integration._fixtures_kafka import (  # noqa: F401 - fixtures for this folder
    brokers,
    group,
    kafka_bin,
    make_topic,
    sources,
)

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "services"




@pytest.fixture
def pg_url() -> str:
    return require_env("INGEST_TEST_POSTGRES_URL", "postgres")


@pytest.fixture
def redis_url() -> str:
    return require_env("INGEST_TEST_REDIS_URL", "redis")


def with_search_path(dsn: str, schema: str) -> str:
    """asyncpg passes unknown DSN query parameters as server settings."""
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}search_path={quote(schema)}"


async def _fresh_schema(dsn: str) -> tuple[str, str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    return schema, with_search_path(dsn, schema)


async def _drop_schema(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def pg_dsn(pg_url: str) -> AsyncIterator[str]:
    """A DSN whose search_path is a fresh schema of its own."""
    schema, dsn = await _fresh_schema(pg_url)
    yield dsn
    await _drop_schema(pg_url, schema)


@pytest.fixture
async def rclient(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = redis_client(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:10]


# -- private servers for the stop / restart tests ------------------------------------------


@dataclass
class PrivateServer:
    script: Path
    env: dict[str, str]
    url: str

    def run(self, command: str) -> None:
        subprocess.run([str(self.script), command], env=self.env, check=True, timeout=60)

    def superuser_sql(self, sql: str) -> None:
        """Postgres only: run SQL as the `postgres` superuser over the private socket."""
        sock = Path(self.env["INGEST_RUN_DIR"]) / "postgres"
        port = self.env["INGEST_TEST_PG_PORT"]
        cmd = ["psql", "-h", str(sock), "-p", port, "-U", "postgres", "-d", "ingest"]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run([*cmd, "-v", "ON_ERROR_STOP=1", "-qc", sql], check=True, timeout=30)


def _private(tmp: Path, name: str, port_var: str, port: str, url_var: str) -> PrivateServer:
    env = {**os.environ, "INGEST_RUN_DIR": str(tmp), port_var: port}
    script = SCRIPTS / f"{name}.sh"
    subprocess.run([str(script), "start"], env=env, check=True, timeout=120)
    url = _env_file(tmp / f"{name}.env")[url_var]
    return PrivateServer(script, env, url)


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivateServer]:
    require_env("INGEST_TEST_POSTGRES_URL", "postgres")  # the scripts must have been set up
    # not under pytest's 0700 tmp root: the server runs as the postgres OS user
    tmp = Path(tempfile.mkdtemp(prefix="ingest-test-pg-"))
    os.chmod(tmp, 0o755)
    port = os.environ.get("INGEST_TEST_PG_PRIVATE_PORT") or str(free_port())
    server = _private(tmp, "postgres", "INGEST_TEST_PG_PORT", port, "INGEST_TEST_POSTGRES_URL")
    yield server
    server.run("stop")
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServer]:
    require_env("INGEST_TEST_REDIS_URL", "redis")
    tmp = tmp_path_factory.mktemp("redisrun")
    port = os.environ.get("INGEST_TEST_REDIS_PRIVATE_PORT") or str(free_port())
    server = _private(tmp, "redis", "INGEST_TEST_REDIS_PORT", port, "INGEST_TEST_REDIS_URL")
    yield server
    server.run("stop")


# -- records ------------------------------------------------------------------------------


def make_record(
    entity_id: str,
    revision: int,
    *,
    tenant: str = "acme",
    entity_type: str = "order",
    deleted: bool = False,
    attributes: dict[str, Any] | None = None,
    occurred_at: str = "2026-01-02T03:04:05.123456Z",
    relations: Iterable[tuple[str, str, str]] = (("PLACED_BY", "customer", "c1"),),
    source: str = "test",
    seq: int | None = None,
    **extra: Any,
) -> Record:
    """A validated v3 record as the pipeline would hand it to a sink (`seq`: the revision
    unless given); `extra` adds top-level keys (priority, ...)."""
    body = v3_body(
        tenant,
        entity_type,
        entity_id,
        revision,
        occurred_at=occurred_at,
        attributes=attributes if attributes is not None else {"amount": revision, "n": "x"},
        relations=relations,
        deleted=deleted,
        **extra,
    )
    body.setdefault("relations", [])
    return record_of(body, source=source, seq=revision if seq is None else seq)


def dlq_entry(
    n: int,
    *,
    at: datetime,
    tenant: str = "acme",
    source: str = "s3-main",
    sink: str | None = "postgres",
    reason: ReasonCode = ReasonCode.SINK_TIMEOUT,
    attempts: int = 1,
    detail: dict[str, Any] | None = None,
    entity: tuple[str, str] | None = None,
) -> DLQEntry:
    """DLQ entry number `n` (its dedupe key, payload and revision follow from `n`; entity
    (type, id) defaults to ("order", "o<n>")), first and last failed `at`."""
    entity_type, entity_id = entity or ("order", f"o{n}")
    return DLQEntry(
        dedupe_key=n.to_bytes(32, "big"),
        tenant=tenant,
        source=source,
        sink=sink,
        reason=reason,
        detail=detail if detail is not None else {"message": f"failure {n}"},
        payload=b'{"n": %d}' % n,
        attempts=attempts,
        first_failed_at=at,
        last_failed_at=at,
        entity_type=entity_type,
        entity_id=entity_id,
        revision=n,
    )


def record_of(body: dict[str, Any], *, source: str = "s", seq: int = 0) -> Record:
    """The Record a decoder would hand a sink for `body` (a valid current-version body)."""
    raw = RawRecord(b"", body["tenant_id"], source, seq, None, 0.0)
    return Record.of(raw, body, dedupe_key(body))
