"""S3 and SFTP for the e2e tests and bench/bench_s3.py: servers, uploads, configs, checks.

Servers: `scripts/services/up.sh seaweedfs sshd postgres redis`; their env files are read from
$INGEST_RUN_DIR at call time (SeaweedFS generates new keys on each start). Each test uses a
bucket prefix and an SFTP subdirectory of its own, a fresh Postgres schema (sink table, DLQ and
the `ingest_source_leases` table all land there) and a Redis db number of its own.

- `s3_env()` / `sftp_env()`: the INGEST_TEST_* settings of the running servers.
- `upload(objects)`: PUT many objects concurrently (aiobotocore), returns key -> ETag.
- `sftp_drop(dir, name, body)`: write a file into an SFTP inbox directory, `.part` then rename.
- `files_config(...)`: a production config with S3 and/or SFTP sources and a Postgres sink.
- `lines(tag, n)`: n valid order records, one entity each (entity ids `<tag>-<i>`).
- `leases(dsn)`: rows of the lease table, for the exactly-once checks.
- `aws_s3_ls(prefix)` / `sftp_batch(commands)`: the operator's tools, run as processes.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import uuid
from pathlib import Path
from typing import Any

import yaml
from aiobotocore.session import get_session

from tests.e2e._feed import TENANT, occurred_at
from tests.e2e._production import RUN_DIR, _env_file, pg_query

BUCKET = "ingest-bucket"

# The tenant's token bucket is a fairness limit, not what these tests exercise: open it wide.
WIDE_ADMISSION: dict[str, Any] = {
    "default_limits": {"rate": 10_000_000, "burst": 10_000_000},
    "queue_high_watermark": 100_000_000,
    "queue_low_watermark": 1_000_000,
}


def _server_env(name: str, required: tuple[str, ...]) -> dict[str, str]:
    path = RUN_DIR / f"{name}.env"
    env = _env_file(path) if path.exists() else {}
    for key in required:
        if key in os.environ and key not in env:
            env[key] = os.environ[key]
        if key not in env:
            raise RuntimeError(
                f"{key} is not set: run `scripts/services/up.sh {name}` ({path} missing)"
            )
    return env


def s3_env() -> dict[str, str]:
    return _server_env(
        "seaweedfs", ("INGEST_TEST_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    )


def sftp_env() -> dict[str, str]:
    return _server_env(
        "sshd",
        (
            "INGEST_TEST_SFTP_HOST",
            "INGEST_TEST_SFTP_PORT",
            "INGEST_TEST_SFTP_USER",
            "INGEST_TEST_SFTP_KEY",
            "INGEST_TEST_SFTP_HOST_KEY",
            "INGEST_TEST_SFTP_DIR",
        ),
    )


def new_prefix(tag: str = "e2e") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}/"


# ---------------------------------------------------------------------- records
_LINE = (
    b'{"schema_version":3,"tenant_id":"%s","entity_type":"order","entity_id":"%s-%d",'
    b'"revision":1,"occurred_at":"%s","priority":"normal",'
    b'"attributes":{"amount":%d.5,"currency":"EUR","status":"new"}}\n'
)


def lines(tag: str, n: int, tenant: str = TENANT) -> bytes:
    """`n` valid records (JSON lines), entity ids `<tag>-0` .. `<tag>-<n-1>`."""
    t, g = tenant.encode(), tag.encode()
    return b"".join(_LINE % (t, g, i, occurred_at(i).encode(), i % 1000) for i in range(n))


# ---------------------------------------------------------------------- S3
def client_kwargs(env: dict[str, str]) -> dict[str, Any]:
    return {
        "endpoint_url": env["INGEST_TEST_S3_ENDPOINT"],
        "region_name": "us-east-1",
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
    }


async def upload_async(objects: dict[str, bytes], concurrency: int = 16) -> dict[str, str]:
    env = s3_env()
    sem = asyncio.Semaphore(concurrency)
    etags: dict[str, str] = {}
    async with get_session().create_client("s3", **client_kwargs(env)) as s3:

        async def put(key: str, body: bytes) -> None:
            async with sem:
                resp = await s3.put_object(Bucket=BUCKET, Key=key, Body=body)
                etags[key] = str(resp["ETag"]).strip('"')

        await asyncio.gather(*(put(k, b) for k, b in objects.items()))
    return etags


def upload(objects: dict[str, bytes], concurrency: int = 16) -> dict[str, str]:
    """PUT every object (key -> body) into the test bucket; key -> ETag."""
    return asyncio.run(upload_async(objects, concurrency))


async def delete_prefix_async(prefix: str) -> None:
    env = s3_env()
    async with get_session().create_client("s3", **client_kwargs(env)) as s3:
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            for i in range(0, len(keys), 1000):
                await s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[i : i + 1000]})


def delete_prefix(prefix: str) -> None:
    asyncio.run(delete_prefix_async(prefix))


def aws_s3_ls(prefix: str) -> str:
    """The runbook's `aws s3 ls s3://ingest-bucket/prefix/ --recursive`, only --endpoint-url
    added (and our prefix for the runbook's placeholder); its stdout."""
    env = s3_env()
    out = subprocess.run(
        ["aws", "s3", "ls", f"s3://{BUCKET}/{prefix}", "--recursive",
         "--endpoint-url", env["INGEST_TEST_S3_ENDPOINT"]],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return out.stdout


def ls_keys(output: str) -> list[str]:
    """Keys from `aws s3 ls --recursive` lines: `DATE TIME SIZE KEY`."""
    return [line.split(None, 3)[3] for line in output.splitlines() if line.strip()]


# ---------------------------------------------------------------------- SFTP
def sftp_dir(tag: str = "e2e") -> Path:
    """A fresh directory in the SFTP server's inbox, owned by the SFTP user (it renames in it)."""
    env = sftp_env()
    d = Path(env["INGEST_TEST_SFTP_DIR"]) / f"{tag}-{uuid.uuid4().hex[:10]}"
    d.mkdir()
    if os.geteuid() == 0:
        ent = pwd.getpwnam(env["INGEST_TEST_SFTP_USER"])
        os.chown(d, ent.pw_uid, ent.pw_gid)
    else:
        d.chmod(0o777)
    return d


def sftp_drop(directory: Path, name: str, body: bytes) -> Path:
    """Write as `<name>.part` (skipped by the source), then rename: never read half-written."""
    part = directory / f"{name}.part"
    part.write_bytes(body)
    target = directory / name
    part.rename(target)
    return target


def sftp_batch(commands: list[str]) -> str:
    """`sftp -b` (OpenSSH) against the test server with the test key, as an operator; stdout.
    Paths are relative to the inbox the server starts the session in."""
    env = sftp_env()
    batch = "\n".join(commands) + "\n"
    known = env.get("INGEST_TEST_SFTP_KNOWN_HOSTS", "/dev/null")
    out = subprocess.run(
        ["sftp", "-b", "-", "-i", env["INGEST_TEST_SFTP_KEY"], "-P", env["INGEST_TEST_SFTP_PORT"],
         "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
         "-o", "BatchMode=yes",
         f"{env['INGEST_TEST_SFTP_USER']}@{env['INGEST_TEST_SFTP_HOST']}"],
        input=batch, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout


def sftp_names(output: str) -> set[str]:
    """Names listed by `ls -1` commands in `sftp -b` output (the echoed `sftp>` lines dropped)."""
    return {
        line.strip().rsplit("/", 1)[-1]
        for line in output.splitlines()
        if line.strip() and not line.startswith("sftp>")
    }


# ---------------------------------------------------------------------- config
def s3_source(prefix: str, name: str = "s3-main", **kw: Any) -> dict[str, Any]:
    env = s3_env()
    return {
        "type": "s3",
        "name": name,
        "url": f"s3://{BUCKET}/{prefix}",
        "tenant": TENANT,
        "endpoint_url": env["INGEST_TEST_S3_ENDPOINT"],
        "region": "us-east-1",
        "access_key_id": env["AWS_ACCESS_KEY_ID"],
        "secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "poll_seconds": 0.5,
        **kw,
    }


def sftp_source(directory: Path, name: str = "sftp-main", **kw: Any) -> dict[str, Any]:
    env = sftp_env()
    return {
        "type": "sftp",
        "name": name,
        "tenant": TENANT,
        "host": env["INGEST_TEST_SFTP_HOST"],
        "port": int(env["INGEST_TEST_SFTP_PORT"]),
        "user": env["INGEST_TEST_SFTP_USER"],
        "key_path": env["INGEST_TEST_SFTP_KEY"],
        "host_key": env["INGEST_TEST_SFTP_HOST_KEY"],
        "directory": directory.name,  # relative to the inbox the server starts sessions in
        "poll_seconds": 0.5,
        "settle_seconds": 0.5,
        **kw,
    }


def files_config(
    path: Path,
    *,
    redis_url: str,
    postgres_url: str,
    sources: list[dict[str, Any]],
    table: str = "entities",
) -> Path:
    """Production config: Redis + Postgres state, a Postgres sink, the given S3/SFTP sources."""
    raw: dict[str, Any] = {
        "state": {"kind": "production", "redis_url": redis_url, "postgres_url": postgres_url},
        "admission": WIDE_ADMISSION,
        "sinks": [{"type": "postgres", "name": "postgres", "table": table}],
        "sources": sources,
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------- checks
def leases(dsn: str, source: str) -> list[tuple[Any, ...]]:
    """(item, version, owner, offset, done_version) per item of `source`, by item."""
    return pg_query(
        dsn,
        'SELECT item, version, owner, "offset", done_version FROM ingest_source_leases'
        f" WHERE source = '{source}' ORDER BY item",
    )


def done_count(dsn: str, source: str) -> int:
    rows = pg_query(
        dsn,
        "SELECT count(*) FROM ingest_source_leases"
        f" WHERE source = '{source}' AND done_version = version",
    )
    return int(rows[0][0])


def table_exists(dsn: str, table: str) -> bool:
    return bool(pg_query(dsn, f"SELECT to_regclass('{table}') IS NOT NULL")[0][0])


def sink_count(dsn: str, table: str = "entities") -> int:
    if not table_exists(dsn, table):
        return 0
    return int(pg_query(dsn, f"SELECT count(*) FROM {table}")[0][0])


def sink_ids(dsn: str, table: str = "entities") -> list[str]:
    return [str(r[0]) for r in pg_query(dsn, f"SELECT entity_id FROM {table}")]


def dlq_count(dsn: str) -> int:
    return int(pg_query(dsn, "SELECT count(*) FROM dlq")[0][0])
