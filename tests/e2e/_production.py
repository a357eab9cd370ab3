"""Production mode for the e2e tests: real Redis and Postgres, the service as a process.

- `PrivateServer` / `private_postgres()` / `private_redis()`: a server of our own, started with
  `scripts/services/{postgres,redis}.sh` under a temporary INGEST_RUN_DIR on a free port, so
  stopping or restarting it (`stop-server`, `start-server`, `restart-server`) disturbs nobody.
- `fresh_schema(url)`: a Postgres schema of our own, as a DSN whose search_path points at it
  (the sink table, `dlq`, `dropped` and `schema_migrations` all land there).
- `write_config(...)`: a production config YAML (state on Redis + Postgres, Postgres sink).
- `redis_cli(url, *args)`: the real `redis-cli` binary, as an operator would run it.
- `pg_query(dsn, sql)`: rows from Postgres (asyncpg), for the exact-count assertions.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import asyncpg  # type: ignore[import-untyped]
import yaml

from tests.conftest import wait_for as wait_for  # re-exported: the e2e modules import it here
from tests.e2e._service import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "services"
RUN_DIR = Path(os.environ.get("INGEST_RUN_DIR", "/tmp/ingest-test-run"))


def _env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            out[key] = value.strip("'\"")
    return out


def shared_env() -> dict[str, str]:
    """INGEST_TEST_* of the shared servers: from the environment, else from $INGEST_RUN_DIR."""
    out: dict[str, str] = {}
    for name in ("postgres.env", "redis.env"):
        if (RUN_DIR / name).exists():
            out.update(_env_file(RUN_DIR / name))
    out.update({k: v for k, v in os.environ.items() if k.startswith("INGEST_TEST_")})
    for key in ("INGEST_TEST_POSTGRES_URL", "INGEST_TEST_REDIS_URL"):
        if key not in out:
            raise RuntimeError(
                f"{key} is not set: run `scripts/services/up.sh postgres redis` and "
                "source the all.env it prints"
            )
    return out


def pg_bin() -> Path:
    env = shared_env()
    if "INGEST_TEST_PG_BIN" in env:
        return Path(env["INGEST_TEST_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not found:
        raise RuntimeError("postgres binaries not found: run scripts/services/postgres.sh install")
    return found[-1]


@dataclass
class PrivateServer:
    """A server started by scripts/services/<name>.sh in a run dir of its own."""

    name: str
    run_dir: Path
    port: int
    url: str
    env: dict[str, str] = field(default_factory=dict)

    def run(self, command: str, timeout: float = 90) -> None:
        subprocess.run(
            [str(SCRIPTS / f"{self.name}.sh"), command],
            env=self.env,
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
        )

    def close(self) -> None:
        try:
            self.run("stop")
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _start_private(name: str, port_var: str, url_var: str) -> PrivateServer:
    shared_env()  # the scripts must have been set up (binaries installed)
    # Not under pytest's 0700 tmp root: the Postgres server runs as the postgres OS user.
    run_dir = Path(tempfile.mkdtemp(prefix=f"ingest-e2e-{name}-"))
    os.chmod(run_dir, 0o755)
    port = free_port()
    env = {**os.environ, "INGEST_RUN_DIR": str(run_dir), port_var: str(port)}
    server = PrivateServer(name, run_dir, port, "", env)
    try:
        server.run("start", timeout=180)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    server.url = _env_file(run_dir / f"{name}.env")[url_var]
    return server


def private_postgres() -> PrivateServer:
    return _start_private("postgres", "INGEST_TEST_PG_PORT", "INGEST_TEST_POSTGRES_URL")


def private_redis() -> PrivateServer:
    return _start_private("redis", "INGEST_TEST_REDIS_PORT", "INGEST_TEST_REDIS_URL")


# ---------------------------------------------------------------------- Postgres
def with_search_path(dsn: str, schema: str) -> str:
    """asyncpg passes unknown DSN query parameters as server settings."""
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}search_path={quote(schema)}"


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _fetch(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


def fresh_schema(url: str, prefix: str = "e2e") -> tuple[str, str]:
    """(schema, DSN with search_path = schema) of a new, empty schema."""
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    asyncio.run(_execute(url, f"CREATE SCHEMA {schema}"))
    return schema, with_search_path(url, schema)


def drop_schema(url: str, schema: str) -> None:
    asyncio.run(_execute(url, f"DROP SCHEMA IF EXISTS {schema} CASCADE"))


def pg_query(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    return asyncio.run(_fetch(dsn, sql))


def pg_execute(dsn: str, sql: str) -> None:
    asyncio.run(_execute(dsn, sql))


# ---------------------------------------------------------------------- Redis
def redis_with_db(url: str, db: int) -> str:
    u = urlparse(url)
    return u._replace(path=f"/{db}").geturl()


def redis_cli(url: str, *args: str, timeout: float = 30) -> str:
    """Run the real redis-cli against `url`; its stdout, stripped."""
    u = urlparse(url)
    db = (u.path or "/0").lstrip("/") or "0"
    cmd = ["redis-cli", "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379), "-n", db]
    out = subprocess.run([*cmd, *args], check=True, timeout=timeout, capture_output=True, text=True)
    return out.stdout.strip()


# ---------------------------------------------------------------------- config
def write_config(
    path: Path,
    *,
    redis_url: str,
    postgres_url: str,
    table: str = "entities",
    retry: dict[str, Any] | None = None,
    breaker: dict[str, Any] | None = None,
    batch_size: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A production config: state on Redis + Postgres, one Postgres sink, inbox + webhooks."""
    inbox: dict[str, Any] = {"type": "inbox", "name": "inbox", "poll_seconds": 0.2}
    webhook: dict[str, Any] = {"type": "webhook", "name": "webhook"}
    if batch_size is not None:
        inbox["batch_size"] = batch_size
        webhook["batch_size"] = batch_size
    raw: dict[str, Any] = {
        "state": {"kind": "production", "redis_url": redis_url, "postgres_url": postgres_url},
        "sinks": [{"type": "postgres", "name": "postgres", "table": table}],
        "sources": [inbox, webhook],
    }
    return dump_config(path, raw, retry=retry, breaker=breaker, extra=extra)


def dump_config(
    path: Path,
    raw: dict[str, Any],
    *,
    retry: dict[str, Any] | None = None,
    breaker: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write config `raw` as YAML, with `retry` and `breaker` sections if given and the
    top-level keys of `extra` on top."""
    if retry:
        raw["retry"] = retry
    if breaker:
        raw["breaker"] = breaker
    raw.update(extra or {})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sink_rows(dsn: str, table: str = "entities") -> dict[str, int]:
    return {eid: rev for eid, rev in pg_query(dsn, f"SELECT entity_id, revision FROM {table}")}


def dlq_reasons(dsn: str) -> dict[str, int]:
    return {r: n for r, n in pg_query(dsn, "SELECT reason, count(*) FROM dlq GROUP BY reason")}


def dlq_lines(dsn: str) -> dict[str, str]:
    """payload (the original line) -> reason of every DLQ row; fails on two rows per line."""
    out: dict[str, str] = {}
    for payload, reason in pg_query(dsn, "SELECT payload, reason FROM dlq"):
        line = bytes(payload).decode()
        assert line not in out, f"two DLQ rows for {line}"
        out[line] = reason
    return out
