"""S3 and SFTP sources end to end: `ingest run` as a process, production mode, real servers.

State on Redis (a private server for this module, one db number per test) and Postgres (a
fresh schema per test: sink table, DLQ and the `ingest_source_leases` table), the Postgres
sink; objects in SeaweedFS under a prefix of our own, files in an OpenSSH SFTP subdirectory of
our own (`scripts/services/up.sh seaweedfs sshd postgres redis`).

1. kill -9 mid-object (S3) and mid-file (SFTP), restart: every record in the sink once.
2. an object whose key sorts below processed keys, uploaded later, is still ingested; the
   runbook's `aws s3 ls ... --recursive` and `sftp -b` see the items; `/health/detailed` via
   curl | jq '.adapters["s3-main"]' and the lag metrics of both sources.
3. two service processes on one bucket prefix of 2,000 objects: each object once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ingest.config import S3SourceConfig, SFTPSourceConfig
from tests.e2e._files import (
    aws_s3_ls,
    delete_prefix,
    dlq_count,
    done_count,
    files_config,
    leases,
    lines,
    ls_keys,
    new_prefix,
    s3_source,
    sftp_batch,
    sftp_dir,
    sftp_drop,
    sftp_names,
    sftp_source,
    sink_count,
    sink_ids,
    upload,
)
from tests.e2e._production import (
    PrivateServer,
    redis_with_db,
    wait_for,
)
from tests.e2e._service import ServiceProcess, free_port, ingest_cli, metric_value

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(360)]




@pytest.fixture()
def prefix() -> Iterator[str]:
    p = new_prefix("e2e-files")
    yield p
    delete_prefix(p)


@pytest.fixture()
def inbox() -> Iterator[Path]:
    d = sftp_dir("e2e-files")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def idempotency_keys(config: Path) -> int:
    out = ingest_cli("idempotency-stats", "--config", str(config), "--json")
    return int(json.loads(out)["keys"])


def checkpoint(svc: ServiceProcess, adapter: str) -> dict[str, object] | None:
    cp: dict[str, object] | None = svc.health()["adapters"][adapter]["last_checkpoint"]
    return cp


# ---------------------------------------------------------------------- 1. kill -9
def test_kill9_mid_object_and_mid_file_then_restart_exactly_once(
    tmp_path: Path, redis_server: PrivateServer, pg_dsn: str, prefix: str, inbox: Path
) -> None:
    per_item = 50_000
    objects = {f"{prefix}orders-{i}.jsonl": lines(f"s3o{i}", per_item) for i in range(2)}
    upload(objects)
    for i in range(2):
        sftp_drop(inbox, f"orders-{i}.jsonl", lines(f"sftpf{i}", per_item))
    expected = {f"{t}{i}-{n}" for t in ("s3o", "sftpf") for i in range(2) for n in range(per_item)}

    config = files_config(
        tmp_path / "ingest.yaml",
        redis_url=redis_with_db(redis_server.url, 1),
        postgres_url=pg_dsn,
        # leases lapse 10 s after the kill (not the default 60 s): the restart takes them over
        sources=[s3_source(prefix, lease_ttl_seconds=10), sftp_source(inbox, lease_ttl_seconds=10)],
    )
    port = free_port()
    data = tmp_path / "data"
    svc = ServiceProcess(data, config=config, port=port).start(wait=60)
    try:
        # Kill as soon as both adapters show a committed batch: well inside a 50k-line item.
        wait_for(
            lambda: checkpoint(svc, "s3-main") and checkpoint(svc, "sftp-main"),
            120, "a first commit of both adapters", interval=0.05,
        )  # fmt: skip
        svc.kill9()
        s3_rows, sftp_rows = leases(pg_dsn, "s3-main"), leases(pg_dsn, "sftp-main")
        at_kill = sink_count(pg_dsn)
        # Mid-item: an item with a committed offset inside it and not done, for both sources.
        assert any(off > 0 and done is None for _, _, _, off, done in s3_rows), s3_rows
        assert any(off > 0 and done is None for _, _, _, off, done in sftp_rows), sftp_rows
        assert any((inbox / name).exists() for name, *_ in sftp_rows)  # not moved yet
        assert 0 < at_kill < len(expected)
        print(f"killed with {at_kill} of {len(expected)} rows in the sink")

        # Restart (a new worker id: it takes the dead worker's leases once their TTL lapses).
        svc = ServiceProcess(data, config=config, port=port).start(wait=60)
        wait_for(
            lambda: done_count(pg_dsn, "s3-main") == 2 and done_count(pg_dsn, "sftp-main") == 2,
            240, "all 4 items done after the restart", interval=0.5,
        )  # fmt: skip
        wait_for(lambda: not any(inbox.glob("*.jsonl")), 30, "the SFTP moves to processed/")

        def caught_up() -> dict[str, Any] | None:
            # Lag is measured when a worker lists its source: a pod's other worker may show the
            # lag of its last listing (items the first one was reading) until its next poll.
            h = svc.health()
            lags = [h["adapters"][a]["lag_seconds"] for a in ("s3-main", "sftp-main")]
            return h if lags == [0.0, 0.0] else None

        health = wait_for(caught_up, 30, "both adapters caught up (lag 0)")
        assert svc.terminate() == 0
    finally:
        svc.stop()

    ids = sink_ids(pg_dsn)
    assert len(ids) == len(expected)  # the primary key makes each entity one row
    assert set(ids) == expected  # none missing
    assert dlq_count(pg_dsn) == 0  # no record refused (a re-read would be absorbed, not DLQ'd)
    assert idempotency_keys(config) == len(expected)  # each record claimed exactly once
    assert sorted(p.name for p in (inbox / "processed").iterdir()) == [
        "orders-0.jsonl", "orders-1.jsonl",
    ]  # fmt: skip
    # The restarted worker read only what was not committed before the kill (resume at the
    # committed offset, not from 0). The sink may hold what was not committed: the last two
    # batches of each item's reader (batch N settling while N+1 is written, docs/architecture.md
    # "Pipelined batches"), so at most 2 items x 2 batches of each source's batch_size more.
    reread = sum(a["records_read"] for a in health["adapters"].values())
    most = 2 * 2 * (_default_batch(S3SourceConfig) + _default_batch(SFTPSourceConfig))
    assert reread <= len(expected) - at_kill + most, (reread, at_kill)


def _default_batch(model: type[S3SourceConfig | SFTPSourceConfig]) -> int:
    """The batch_size these configs leave to the default (s3_source / sftp_source set none)."""
    return int(model.model_fields["batch_size"].default)


# ---------------------------------------------------------------------- 2, 4, 5
def test_late_lower_key_runbook_tools_and_health(
    tmp_path: Path, redis_server: PrivateServer, pg_dsn: str, prefix: str, inbox: Path
) -> None:
    n = 500
    upload({f"{prefix}b-{i:03d}.jsonl": lines(f"b{i}", n) for i in range(3)})
    for i in range(2):
        sftp_drop(inbox, f"f-{i}.jsonl", lines(f"f{i}", n))

    # What the service is about to read, as the runbook's tools show it.
    listed = ls_keys(aws_s3_ls(prefix))
    assert listed == [f"{prefix}b-{i:03d}.jsonl" for i in range(3)]
    before = sftp_names(sftp_batch([f"ls -1 {inbox.name}"]))
    assert before == {"f-0.jsonl", "f-1.jsonl"}

    config = files_config(
        tmp_path / "ingest.yaml",
        redis_url=redis_with_db(redis_server.url, 2),
        postgres_url=pg_dsn,
        sources=[s3_source(prefix), sftp_source(inbox)],
    )
    svc = ServiceProcess(tmp_path / "data", config=config).start(wait=60)
    try:
        wait_for(lambda: sink_count(pg_dsn) == 5 * n, 120, f"{5 * n} rows", interval=0.3)
        wait_for(lambda: done_count(pg_dsn, "sftp-main") == 2, 30, "SFTP files done")
        wait_for(lambda: not any(inbox.glob("*.jsonl")), 30, "the SFTP moves to processed/")
        after = sftp_batch([f"ls -1 {inbox.name}", f"ls -1 {inbox.name}/processed"])
        assert sftp_names(after) == {"processed", "f-0.jsonl", "f-1.jsonl"}
        assert sftp_names(sftp_batch([f"ls -1 {inbox.name}/processed"])) == {
            "f-0.jsonl", "f-1.jsonl",
        }  # fmt: skip

        # A key sorting below every processed one, uploaded later: still read.
        upload({f"{prefix}a-000.jsonl": lines("late", n)})
        assert ls_keys(aws_s3_ls(prefix))[0] == f"{prefix}a-000.jsonl"
        wait_for(lambda: sink_count(pg_dsn) == 6 * n, 60, "the late object's rows", interval=0.3)
        wait_for(lambda: done_count(pg_dsn, "s3-main") == 4, 30, "4 objects done")

        # The runbook's adapter check, run as written (the host differs, and curl sends the
        # operator token: `svc.runbook` adds -H "Authorization: Bearer $INGEST_TOKEN").
        jq = subprocess.run(
            ["bash", "-c", svc.runbook(
                """curl -s http://ingest-service:8080/health/detailed | jq '.adapters["s3-main"]'"""
            )],
            capture_output=True, text=True, timeout=30, check=True, env=svc.env,
        )  # fmt: skip
        adapter = json.loads(jq.stdout)
        assert adapter["kind"] == "s3" and adapter["status"] in ("idle", "running"), adapter
        assert isinstance(adapter["lag_seconds"], float | int) and adapter["lag_seconds"] >= 0
        assert adapter["last_checkpoint"]["key"] == f"{prefix}a-000.jsonl"
        assert adapter["records_read"] == 4 * n
        sftp_health = svc.health()["adapters"]["sftp-main"]
        assert sftp_health["kind"] == "sftp" and "lag_seconds" in sftp_health

        metrics = svc.metrics()
        for source, records in (("s3-main", 4 * n), ("sftp-main", 2 * n)):
            assert f'ingest_adapter_lag_seconds{{adapter="{source}"}}' in metrics
            count = metric_value(metrics, "ingest_lag_seconds_count", source=source)
            assert count == records, (source, count)
        assert svc.terminate() == 0
    finally:
        svc.stop()
    ids = set(sink_ids(pg_dsn))
    assert {f"late-{i}" for i in range(n)} <= ids and len(ids) == 6 * n
    assert dlq_count(pg_dsn) == 0


# ---------------------------------------------------------------------- 3. two workers
def test_two_workers_2000_objects_each_once(
    tmp_path: Path, redis_server: PrivateServer, pg_dsn: str, prefix: str
) -> None:
    n_objects, per_object = 2000, 10
    total = n_objects * per_object
    config = files_config(
        tmp_path / "ingest.yaml",
        redis_url=redis_with_db(redis_server.url, 3),
        postgres_url=pg_dsn,
        sources=[s3_source(prefix, poll_seconds=1.0)],
    )
    workers = [ServiceProcess(tmp_path / f"w{i}", config=config) for i in range(2)]
    try:
        # Both services are up before the first object exists: a pod that became ready first
        # could otherwise read all 2000 small objects before the other one started (CI on
        # 2f97739: [20000, 0]).
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda w: w.start(wait=60), workers))
        t0 = time.monotonic()
        etags = upload(
            {f"{prefix}o-{i:04d}.jsonl": lines(f"w{i}", per_object) for i in range(n_objects)},
            concurrency=32,
        )
        wait_for(
            lambda: done_count(pg_dsn, "s3-main") == n_objects, 240,
            f"{n_objects} objects done", interval=1.0,
        )  # fmt: skip
        elapsed = time.monotonic() - t0
        wait_for(lambda: sink_count(pg_dsn) == total, 30, f"{total} rows")
        read = [w.health()["adapters"]["s3-main"]["records_read"] for w in workers]
        for w in workers:
            assert w.terminate() == 0
    finally:
        for w in workers:
            w.stop()
    print(f"2 workers, {n_objects} objects: {elapsed:.1f}s, records read per worker {read}")
    rows = leases(pg_dsn, "s3-main")
    assert len(rows) == n_objects
    assert {item: done for item, _, _, _, done in rows} == etags  # each object done, this version
    owners = {owner for _, _, owner, _, _ in rows}
    assert len(owners) >= 2, owners  # both services took objects (each is a pod of workers)
    assert sum(read) == total  # no object read twice (by either worker)
    assert all(r > 0 for r in read)
    assert sink_count(pg_dsn) == total
    assert len(set(sink_ids(pg_dsn))) == total
    assert dlq_count(pg_dsn) == 0
    assert idempotency_keys(config) == total
