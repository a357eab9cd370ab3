"""Production mode: kill -9 at random moments while 200k records arrive; then exact counts.

The service runs as a process with state on Redis (checkpoints, idempotency keys) and Postgres
(DLQ), and the Postgres sink. Inbox files and webhook requests carry valid records, older
revisions, exact duplicates, schema drift and malformed lines. After the kills and a final
restart, the sink must hold each valid entity once at its highest revision and the DLQ exactly
the malformed, drifted and older-revision records, one row each; the idempotency store must
count exactly the distinct valid records. Webhook senders resend until they get a 202.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e._auth import sign_headers
from tests.e2e._production import (
    TENANT,
    Feed,
    PrivateServer,
    dlq_lines,
    dlq_reasons,
    drop_file,
    drop_schema,
    fresh_schema,
    private_redis,
    shared_env,
    sink_rows,
    write_config,
)
from tests.e2e._service import ROOT, ServiceProcess, finished, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]
SEED = int(os.environ.get("INGEST_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))


@pytest.fixture()
def redis_server() -> Iterator[PrivateServer]:
    server = private_redis()
    yield server
    server.close()


@pytest.fixture()
def pg_dsn() -> Iterator[str]:
    url = shared_env()["INGEST_TEST_POSTGRES_URL"]
    schema, dsn = fresh_schema(url, "e2e_crash")
    yield dsn
    drop_schema(url, schema)


def post_all(url: str, bodies: list[str], stop: threading.Event) -> None:
    """Send each body until it gets a 202, like a client that retries on failure."""
    with httpx.Client(timeout=10) as client:
        for body in bodies:
            while not stop.is_set():
                try:
                    r = client.post(  # signed afresh on every attempt
                        url,
                        content=body,
                        headers=sign_headers(TENANT, body, content_type="application/x-ndjson"),
                    )
                    if r.status_code == 202:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)



def test_kill9_during_200k_records_loses_and_doubles_nothing(
    tmp_path: Path, redis_server: PrivateServer, pg_dsn: str
) -> None:
    rng = random.Random(SEED)
    print(f"crash test seed: {SEED} (set INGEST_CRASH_SEED to replay)")
    feed = Feed(rng)
    data = tmp_path / "data"
    inbox = data / "inbox" / TENANT
    n_lines = 0
    for f in range(12):  # ~165k lines in 12 files
        lines = feed.unit(f"file{f}", 8_300)
        n_lines += len(lines)
        drop_file(inbox, f"orders-{f}.jsonl", lines)
    bodies = []
    for b in range(300):  # ~45k lines in 300 requests
        lines = feed.unit(f"hook{b}", 92)
        n_lines += len(lines)
        bodies.append("\n".join(lines))
    assert n_lines >= 200_000

    config = write_config(tmp_path / "ingest.yaml", redis_url=redis_server.url, postgres_url=pg_dsn)
    port = free_port()
    svc = ServiceProcess(data, config=config, port=port).start(wait=60)
    stop = threading.Event()
    sender = threading.Thread(
        target=post_all, args=(f"{svc.url}/v1/webhooks/{TENANT}/shop", bodies, stop), daemon=True
    )
    sender.start()
    kills = 0
    try:
        for _ in range(6):
            time.sleep(rng.uniform(0.5, 4.0))
            if finished(svc, inbox) and not sender.is_alive():
                break
            svc.kill9()
            kills += 1
            svc = ServiceProcess(data, config=config, port=port).start(wait=60)
        sender.join(timeout=240)
        assert not sender.is_alive(), "webhook sender did not finish"
        deadline = time.monotonic() + 240
        while not finished(svc, inbox):
            assert time.monotonic() < deadline, f"not finished: {svc.health()}"
            time.sleep(0.3)
        assert svc.terminate() == 0
    finally:
        stop.set()
        svc.stop()
    assert kills >= 1
    print(f"{n_lines} lines, {kills} kills")

    rows = sink_rows(pg_dsn)
    missing = set(feed.final) - set(rows)
    assert not missing, f"{len(missing)} entities missing, e.g. {sorted(missing)[:5]}"
    assert len(rows) == len(feed.final)
    assert rows == feed.final
    # Every record the feed makes a DLQ record is there, once, with its reason.
    got = dlq_lines(pg_dsn)
    assert {line: got.get(line) for line in feed.dlq_lines} == feed.dlq_lines
    # Nothing more: a batch replayed after a kill between its sink write and its idempotency
    # claim is judged against the revision stored before its first pass (sinks/base.py).
    assert got == feed.dlq_lines
    assert dlq_reasons(pg_dsn) == dict(feed.dlq)

    # The idempotency store counts each distinct valid record exactly once, whatever the kills.
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingest.cli.ingest",
            "idempotency-stats",
            "--config",
            str(config),
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout)["keys"] == len(feed.keyed)
