"""Fixtures and helpers for the S3 and SFTP source tests (real SeaweedFS and OpenSSH servers).

Servers: `scripts/services/up.sh seaweedfs sshd`, then source the all.env it prints.
Its fixtures are registered for the folder by tests/integration/conftest.py.
Each test gets its own bucket prefix / inbox subdirectory and its own SQLite state file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session

from ingest.config import S3SourceConfig, SFTPSourceConfig
from ingest.sources.base import SourceBatch
from ingest.sources.objects import ItemSource
from ingest.state.leases import SQLiteLeaseStore
from ingest.state.sqlite import SQLiteCheckpointStore, SQLiteDB
from tests.conftest import require_env

BUCKET = "ingest-bucket"




# -- S3 ---------------------------------------------------------------------------------------


@pytest.fixture
def s3_endpoint() -> str:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        require_env(var, "seaweedfs")
    return require_env("INGEST_TEST_S3_ENDPOINT", "seaweedfs")


@pytest.fixture
async def s3(s3_endpoint: str) -> AsyncIterator[Any]:
    """A raw aiobotocore client, for uploading test objects."""
    async with get_session().create_client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1"
    ) as client:
        yield client


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}/"


def s3_config(endpoint: str, prefix: str, **kw: Any) -> S3SourceConfig:
    base: dict[str, Any] = {
        "name": "s3-test",
        "url": f"s3://{BUCKET}/{prefix}",
        "tenant": "acme",
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "poll_seconds": 0.2,
        "batch_size": 100,
    }
    return S3SourceConfig(**{**base, **kw})


async def put(s3: Any, key: str, body: bytes) -> str:
    resp = await s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    return str(resp["ETag"]).strip('"')


def jsonl(tag: str, n: int, start: int = 0) -> bytes:
    return b"".join(b'{"id":"%s-%d","n":%d}\n' % (tag.encode(), i, i) for i in range(start, n))


# -- state ------------------------------------------------------------------------------------


class State:
    def __init__(self, db: SQLiteDB) -> None:
        self.db = db
        self.checkpoints = SQLiteCheckpointStore(db, "test")
        self.leases = SQLiteLeaseStore(db)


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[State]:
    db = await SQLiteDB.open(tmp_path / "state.db")
    yield State(db)
    await db.close()


# -- running a source -------------------------------------------------------------------------


class Pump:
    """Runs `source.batches()` in a task, like a worker would, and hands batches to the test.

    `take` commits each batch in order (unless told not to) and returns them; `kill` drops the
    task without closing the source (leases are not released, as in a crash)."""

    def __init__(self, source: ItemSource) -> None:
        self.source = source
        self.queue: asyncio.Queue[SourceBatch] = asyncio.Queue(maxsize=2)
        self.committed: list[SourceBatch] = []
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Pump:
        await self.source.start()
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for batch in self.source.batches():
            await self.queue.put(batch)

    async def next(self, timeout: float = 15.0) -> SourceBatch:
        get = asyncio.ensure_future(self.queue.get())
        assert self.task is not None
        done, _ = await asyncio.wait(
            {get, self.task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if get in done:
            return get.result()
        get.cancel()
        if self.task in done:
            self.task.result()  # re-raise whatever ended the pump
            raise AssertionError("source.batches() ended early")
        raise AssertionError(f"no batch within {timeout}s; health={self.source.health()}")

    async def take(
        self, records: int, *, commit: bool = True, timeout: float = 15.0
    ) -> list[SourceBatch]:
        """Batches until at least `records` records arrived."""
        out: list[SourceBatch] = []
        while sum(len(b.records) for b in out) < records:
            batch = await self.next(timeout)
            out.append(batch)
            if commit:
                await self.source.commit(batch)
                self.committed.append(batch)
        return out

    async def quiet(self, seconds: float) -> None:
        """Assert nothing more arrives for `seconds`."""
        with contextlib.suppress(asyncio.TimeoutError):
            batch = await asyncio.wait_for(self.queue.get(), seconds)
            raise AssertionError(f"unexpected batch at {batch.position}")

    async def kill(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def close(self) -> None:
        await self.source.stop()
        await self.kill()
        await self.source.close()


def record_ids(batches: list[SourceBatch]) -> list[str]:
    import orjson

    return [str(orjson.loads(r.data)["id"]) for b in batches for r in b.records if not r.meta]


# -- SFTP -------------------------------------------------------------------------------------


class SFTPServer:
    def __init__(self) -> None:
        self.host = require_env("INGEST_TEST_SFTP_HOST", "sshd")
        self.port = int(require_env("INGEST_TEST_SFTP_PORT", "sshd"))
        self.user = require_env("INGEST_TEST_SFTP_USER", "sshd")
        self.key = Path(require_env("INGEST_TEST_SFTP_KEY", "sshd"))
        self.host_key = require_env("INGEST_TEST_SFTP_HOST_KEY", "sshd")
        self.inbox = Path(require_env("INGEST_TEST_SFTP_DIR", "sshd"))


@pytest.fixture
def sftp_server() -> SFTPServer:
    return SFTPServer()


@pytest.fixture
def sftp_dir(sftp_server: SFTPServer) -> Path:
    """A fresh directory inside the server's inbox, writable by the SFTP user."""
    d = sftp_server.inbox / f"t-{uuid.uuid4().hex[:10]}"
    d.mkdir()
    if os.geteuid() == 0:
        ent = pwd.getpwnam(sftp_server.user)
        os.chown(d, ent.pw_uid, ent.pw_gid)
    else:
        d.chmod(0o777)
    return d


def sftp_config(server: SFTPServer, directory: Path, **kw: Any) -> SFTPSourceConfig:
    base: dict[str, Any] = {
        "name": "sftp-test",
        "tenant": "acme",
        "host": server.host,
        "port": server.port,
        "user": server.user,
        "key_path": server.key,
        "host_key": server.host_key,
        "directory": directory.name,  # relative to the inbox the server starts in
        "poll_seconds": 0.2,
        "settle_seconds": 1.0,
        "batch_size": 100,
    }
    return SFTPSourceConfig(**{**base, **kw})


# -- a worker process to kill (python -m tests.integration._fixtures_files s3-child ARGS) ------


async def _s3_child(args: dict[str, Any]) -> None:
    """Commit `commit` batches (ids appended to `out` after each commit), read one more without
    committing, print READY and hang until killed."""
    import orjson

    from ingest.sources.s3 import S3Source

    db = await SQLiteDB.open(Path(args["db"]))
    st = State(db)
    cfg = s3_config(args["endpoint"], args["prefix"])
    source = S3Source(
        cfg, st.checkpoints, st.leases, worker_id=args["worker"], lease_ttl=args["ttl"]
    )
    pump = await Pump(source).start()
    with open(args["out"], "ab") as out:
        for _ in range(args["commit"]):
            batch = await pump.next()
            await source.commit(batch)
            for r in batch.records:
                out.write(orjson.loads(r.data)["id"].encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())
    await pump.next()  # read, never committed
    print("READY", flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    import sys

    import orjson

    if sys.argv[1] == "s3-child":
        asyncio.run(_s3_child(orjson.loads(sys.argv[2])))
