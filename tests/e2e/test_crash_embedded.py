"""kill -9 at random moments while 100k records arrive by inbox and webhooks; then exact counts.

The feed knows what must land: each valid entity once at its highest revision, and the DLQ
exactly the malformed, drifted and older-revision records, one row each. Webhook senders behave
as real clients: a request without a 202 (refused, or the process died) is sent again.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import rec
from tests.e2e._auth import sign_headers
from tests.e2e._service import ServiceProcess, finished, free_port

pytestmark = pytest.mark.e2e
TENANT = "acme-corp"
SEED = int(os.environ.get("INGEST_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))


class Feed:
    """Lines grouped per unit (an inbox file or a webhook request), plus what must result."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.final: dict[str, int] = {}
        self.dlq: Counter[str] = Counter()
        self._bad_lines: set[str] = set()

    def unit(self, prefix: str, n_entities: int) -> list[str]:
        lines: list[str] = []
        for e in range(n_entities):
            eid = f"{prefix}-{e}"
            revs = [1] if self.rng.random() < 0.7 else self.rng.sample(range(1, 9), 3)
            high = 0
            for r in revs:
                lines.append(json.dumps(rec(eid, r)))
                if r < high:
                    self.dlq["OLDER_REVISION"] += 1
                high = max(high, r)
            self.final[eid] = high
            roll = self.rng.random()
            if roll < 0.03:
                lines.append(lines[-1])  # exact duplicate: no effect
            elif roll < 0.05:
                self._bad(lines, json.dumps(rec(f"{eid}-d", 1, attributes={"amount": "1.5"})),
                          "SCHEMA_DRIFT")
            elif roll < 0.06:
                self._bad(lines, '{"broken": ' + eid, "VALIDATION_FAIL")
        return lines

    def _bad(self, lines: list[str], line: str, reason: str) -> None:
        lines.append(line)
        if line not in self._bad_lines:
            self._bad_lines.add(line)
            self.dlq[reason] += 1


def post_all(url: str, bodies: list[str], stop: threading.Event) -> None:
    """Send each body until it gets a 202, like a client that retries on failure."""
    with httpx.Client(timeout=10) as client:
        for body in bodies:
            while not stop.is_set():
                try:
                    r = client.post(url, content=body,  # signed afresh on every attempt
                                    headers=sign_headers(TENANT, body,
                                                         content_type="application/x-ndjson"))
                    if r.status_code == 202:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)



def test_kill9_during_100k_records_loses_and_doubles_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    print(f"crash test seed: {SEED} (set INGEST_CRASH_SEED to replay)")
    feed = Feed(rng)
    data = tmp_path / "data"
    inbox = data / "inbox" / TENANT
    inbox.mkdir(parents=True)
    n_lines = 0
    for f in range(8):  # ~80k lines in 8 files
        lines = feed.unit(f"file{f}", 7_800)
        n_lines += len(lines)
        tmp = inbox / f".f{f}.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        tmp.rename(inbox / f"orders-{f}.jsonl")
    bodies = []
    for b in range(200):  # ~20k lines in 200 requests
        lines = feed.unit(f"hook{b}", 78)
        n_lines += len(lines)
        bodies.append("\n".join(lines))
    assert n_lines >= 100_000

    port = free_port()
    svc = ServiceProcess(data, port=port).start()
    stop = threading.Event()
    sender = threading.Thread(target=post_all, args=(f"{svc.url}/v1/webhooks/{TENANT}/shop",
                                                     bodies, stop), daemon=True)
    sender.start()
    kills = 0
    try:
        for _ in range(6):
            time.sleep(rng.uniform(0.3, 2.5))
            if finished(svc, inbox) and not sender.is_alive():
                break
            svc.kill9()
            kills += 1
            svc = ServiceProcess(data, port=port).start()
        sender.join(timeout=300)
        assert not sender.is_alive(), "webhook sender did not finish"
        deadline = time.monotonic() + 300
        while not finished(svc, inbox):
            assert time.monotonic() < deadline, f"not finished: {svc.health()}"
            time.sleep(0.3)
        assert svc.terminate() == 0
    finally:
        stop.set()
        svc.stop()
    assert kills >= 1

    sink = sqlite3.connect(data / "sink.db")
    rows = dict(sink.execute("SELECT entity_id, revision FROM entities"))
    missing = set(feed.final) - set(rows)
    assert not missing, f"{len(missing)} entities missing, e.g. {sorted(missing)[:5]}"
    assert rows == feed.final
    state = sqlite3.connect(data / "state.db")
    dlq = Counter(r for (r,) in state.execute("SELECT reason FROM dlq"))
    assert dlq == feed.dlq
