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
from pathlib import Path

import pytest

from tests.e2e._crash import kill9_while_sending
from tests.e2e._feed import TENANT, Feed, seeded
from tests.e2e._production import (
    PrivateServer,
    dlq_lines,
    dlq_reasons,
    sink_rows,
    write_config,
)
from tests.e2e._service import ServiceProcess, free_port, ingest_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def test_kill9_during_200k_records_loses_and_doubles_nothing(
    tmp_path: Path, redis_server: PrivateServer, pg_dsn: str
) -> None:
    rng = seeded()
    feed = Feed(rng)
    data = tmp_path / "data"
    inbox = data / "inbox" / TENANT
    # ~165k lines in 12 files, ~45k lines in 300 requests
    bodies, n_lines = feed.drop_and_post(inbox, files=(12, 8_300), requests=(300, 92))
    assert n_lines >= 200_000

    config = write_config(tmp_path / "ingest.yaml", redis_url=redis_server.url, postgres_url=pg_dsn)
    port = free_port()
    kills = kill9_while_sending(
        lambda: ServiceProcess(data, config=config, port=port).start(wait=60),
        inbox,
        bodies,
        rng,
        pause=(0.5, 4.0),
        timeout=240,
    )
    assert kills >= 1
    print(f"{n_lines} lines, {kills} kills")

    rows = sink_rows(pg_dsn)
    feed.assert_rows(rows)
    assert len(rows) == len(feed.final)
    # Every record the feed makes a DLQ record is there, once, with its reason.
    got = dlq_lines(pg_dsn)
    assert {line: got.get(line) for line in feed.dlq_lines} == feed.dlq_lines
    # Nothing more: a batch replayed after a kill between its sink write and its idempotency
    # claim is judged against the revision stored before its first pass (sinks/base.py).
    assert got == feed.dlq_lines
    assert dlq_reasons(pg_dsn) == dict(feed.dlq)

    # The idempotency store counts each distinct valid record exactly once, whatever the kills.
    out = ingest_cli("idempotency-stats", "--config", str(config), "--json")
    assert json.loads(out)["keys"] == len(feed.keyed)
