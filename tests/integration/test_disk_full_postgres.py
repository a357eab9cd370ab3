"""Production stores, full disk: a Postgres whose tables live on a small filesystem.

A private Postgres (scripts/services/postgres.sh) gets a tablespace on a tmpfs of a few MB;
the sink's table and the DLQ are created there (default_tablespace in the DSN), the WAL stays
on the big disk. Filling the tmpfs makes every write fail with SQLSTATE 53100 (disk_full):
the pipeline must wait it out (no CONNECTION_ERROR, no breaker, no DLQ entry for a valid
record), show it, give up promptly when stopping, and deliver everything once space is back.
Mounting needs root with CAP_SYS_ADMIN; where refused, the test says so as a skip.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.config import parse_config
from ingest.errors import Abandoned
from ingest.metrics import Metrics
from ingest.pipeline.admission import Admission
from ingest.pipeline.breaker import CircuitBreaker
from ingest.pipeline.decode import Decoder
from ingest.pipeline.retry import RetryPolicy
from ingest.pipeline.worker import Pipeline, SinkLane
from ingest.records import RawRecord
from ingest.sinks.postgres import PostgresSink
from ingest.state.base import DLQFilter
from ingest.state.postgres import PostgresDLQStore, PostgresDroppedStore, connect_pool, migrate
from ingest.state.sqlite import SQLiteDB
from ingest.state.sqlite_idem import SQLiteIdempotencyStore
from tests.integration.conftest import PrivateServer

pytestmark = pytest.mark.integration

MB = 1024 * 1024


@pytest.fixture(scope="module")
def small_tablespace(private_postgres: PrivateServer) -> Iterator[tuple[PrivateServer, Path]]:
    root = Path(tempfile.mkdtemp(prefix="ingest-ts-"))
    os.chmod(root, 0o755)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(root)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): "
                    f"{done.stderr.strip()}")
    try:
        location = root / "ts"
        location.mkdir()
        shutil.chown(location, "postgres", "postgres")
        private_postgres.superuser_sql(f"CREATE TABLESPACE small LOCATION '{location}'")
        private_postgres.superuser_sql("GRANT CREATE ON TABLESPACE small TO ingest")
        yield private_postgres, root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def fill(root: Path) -> Path:
    ballast = root / "ballast"
    with open(ballast, "ab") as fh:
        while True:
            try:
                fh.write(b"\0" * MB)
                fh.flush()
            except OSError:
                break
    return ballast


def line(eid: str) -> bytes:
    return (b'{"schema_version":3,"tenant_id":"t","entity_type":"order","entity_id":"%s",'
            b'"revision":1,"occurred_at":"2025-01-01T00:00:00Z","attributes":{"pad":"%s"}}'
            % (eid.encode(), b"x" * 400))


async def test_a_full_postgres_disk_is_waited_out(
        small_tablespace: tuple[PrivateServer, Path], tmp_path: Path) -> None:
    server, root = small_tablespace
    dsn = f"{server.url}?default_tablespace=small"
    pool = await connect_pool(dsn)
    await migrate(pool)
    sink = PostgresSink("postgres", dsn)
    await sink.start()
    state = await SQLiteDB.open(tmp_path / "state.db")
    config = parse_config({"sinks": [{"type": "postgres", "name": "postgres",
                                      "dsn": "postgresql://x@127.0.0.1/x"}]})
    pipe = Pipeline(
        config=config, admission=Admission(config.admission, config.limits_for),
        idempotency=SQLiteIdempotencyStore(state), dlq=PostgresDLQStore(pool),
        dropped=PostgresDroppedStore(pool),
        lanes={"postgres": SinkLane(sink, CircuitBreaker("postgres", failure_threshold=2))},
        metrics=Metrics(), retry=RetryPolicy(max_attempts=2, base_delay=0.05, max_total=1),
        rng=random.Random(1),
    )
    pipe.stopping = asyncio.Event()
    try:
        ballast = fill(root)
        raws = [RawRecord(line(f"e{i}"), "t", "s", i, i, 0.0) for i in range(3000)]
        task = asyncio.create_task(pipe.deliver(raws, Decoder().decode_many(raws)))
        async with asyncio.timeout(60):
            while pipe.disk_full_since is None:
                assert not task.done(), task.result()
                await asyncio.sleep(0.1)
        assert "DiskFullError" in (pipe.disk_full_error or "")
        assert pipe.lanes["postgres"].breaker.state.value == "closed"
        assert pipe.metrics.registry.get_sample_value("ingest_disk_full") == 1
        await asyncio.sleep(2)  # still waiting, not giving up into the DLQ
        assert not task.done()
        ballast.unlink()
        report = await asyncio.wait_for(task, 120)
        assert (report.delivered, report.dlq) == (3000, 0)
        assert await pipe.dlq.count(DLQFilter()) == 0
        assert await sink.count() == 3000
        assert pipe.disk_full_since is None

        # full again, and the service stops: the wait gives up at once (batch uncommitted)
        ballast = fill(root)
        more = [RawRecord(line(f"m{i}"), "t", "s", i, i, 0.0) for i in range(3000)]
        task = asyncio.create_task(pipe.deliver(more, Decoder().decode_many(more)))
        async with asyncio.timeout(60):
            while pipe.disk_full_since is None:
                await asyncio.sleep(0.1)
        pipe.stopping.set()
        with pytest.raises(Abandoned):
            await asyncio.wait_for(task, 10)
        ballast.unlink()
    finally:
        await sink.close()
        await pool.close()
        await state.close()
