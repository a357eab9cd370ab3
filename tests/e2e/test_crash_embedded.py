"""kill -9 at random moments while 100k records arrive by inbox and webhooks; then exact counts.

The feed knows what must land: each valid entity once at its highest revision, and the DLQ
exactly the malformed, drifted and older-revision records, one row each. Webhook senders behave
as real clients: a request without a 202 (refused, or the process died) is sent again.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e._crash import kill9_while_sending
from tests.e2e._feed import TENANT, Feed, seeded
from tests.e2e._service import ServiceProcess, free_port

pytestmark = pytest.mark.e2e


def test_kill9_during_100k_records_loses_and_doubles_nothing(tmp_path: Path) -> None:
    rng = seeded()
    feed = Feed(rng)
    data = tmp_path / "data"
    inbox = data / "inbox" / TENANT
    inbox.mkdir(parents=True)
    # ~80k lines in 8 files, ~20k lines in 200 requests
    bodies, n_lines = feed.drop_and_post(inbox, files=(8, 7_800), requests=(200, 78))
    assert n_lines >= 100_000

    port = free_port()
    kills = kill9_while_sending(
        lambda: ServiceProcess(data, port=port).start(),
        inbox,
        bodies,
        rng,
        pause=(0.3, 2.5),
        timeout=300,
    )
    assert kills >= 1

    sink = sqlite3.connect(data / "sink.db")
    feed.assert_rows(dict(sink.execute("SELECT entity_id, revision FROM entities")))
    state = sqlite3.connect(data / "state.db")
    dlq = Counter(r for (r,) in state.execute("SELECT reason FROM dlq"))
    assert dlq == feed.dlq
