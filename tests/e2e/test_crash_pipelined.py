"""kill -9 while batch N settles and batch N+1 is written: the sink and the DLQ stay exact.

The runner writes batch N+1 to the sinks while batch N's DLQ entries, claims and commit are
still being written, but only when the two batches share no entity (docs/architecture.md,
"Pipelined batches"). The feed is built, batch by batch (small inbox batches, so hundreds of
boundaries), to hit both cases at every boundary:

* disjoint neighbours whose entities have superseded revisions inside the batch (3, 1, 2:
  two OLDER_REVISION entries), which a replay must judge exactly as the first pass did;
* neighbours sharing an entity across the boundary, revision 1 at the end of batch N and
  revision 2 at the start of N+1: both apply, no DLQ entry. Had N+1 been written while N
  was unsettled, a kill there would replay N against N+1's revision 2 and put a false
  OLDER_REVISION in the DLQ.

The service is killed with SIGKILL at random moments, restarted each time; at the end every
entity holds its highest revision and the DLQ holds exactly the expected OLDER_REVISION rows.
Once with the SQLite sink (one write at a time) and once with the Postgres sink, where two
disjoint batches are in the sink at once (`Pipeline.write_depth` 2) and commits run behind.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import rec
from tests.e2e._crash import Crashes, wait_finished
from tests.e2e._feed import TENANT, drop_file, seeded
from tests.e2e._production import drop_schema, fresh_schema, pg_query, shared_env
from tests.e2e._service import ServiceProcess, finished, free_port

pytestmark = pytest.mark.e2e
BATCH = 20
CONFIG = f"""
sources:
  - {{type: inbox, name: inbox, batch_size: {BATCH}, poll_seconds: 0.1}}
admission:
  default_limits: {{rate: 10000000, burst: 10000000}}
"""


class Feed:
    """Files of whole batches; `final` and `older` are what an uninterrupted run leaves."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.final: dict[str, int] = {}
        self.older: set[tuple[str, int]] = set()

    def _add(self, out: list[str], entity_id: str, revision: int) -> None:
        out.append(json.dumps(rec(entity_id, revision)))
        high = self.final.get(entity_id, 0)
        if revision < high:
            self.older.add((entity_id, revision))
        self.final[entity_id] = max(high, revision)

    def file(self, name: str, batches: int) -> list[str]:
        out: list[str] = []
        for b in range(batches):
            start = len(out)
            shared = b % 2 == 1  # odd batches open with the entity the previous batch closed
            if shared:
                self._add(out, f"{name}-x{b - 1}", 2)
            n = 0
            while len(out) - start < BATCH - (0 if b % 2 == 1 else 1):
                eid = f"{name}-b{b}-{n}"
                n += 1
                room = BATCH - (len(out) - start) - (0 if shared else 1)
                revs = [3, 1, 2] if room >= 3 and self.rng.random() < 0.5 else [1]
                for r in revs:
                    self._add(out, eid, r)
            if not shared:
                self._add(out, f"{name}-x{b}", 1)  # its revision 2 opens the next batch
            assert len(out) - start == BATCH
        return out


@pytest.fixture(params=["sqlite", "postgres"])
def sink(request: pytest.FixtureRequest) -> Iterator[tuple[str, str | None]]:
    """The sink: SQLite (one write at a time) or Postgres (two at once: write_depth 2), as
    (its YAML, the DSN of its schema or None)."""
    if request.param == "sqlite":
        yield "", None
        return
    url = shared_env()["INGEST_TEST_POSTGRES_URL"]
    schema, dsn = fresh_schema(url, "e2e_pipelined")
    try:
        yield f'sinks: [{{type: postgres, name: pg, dsn: "{dsn}"}}]\n', dsn
    finally:
        drop_schema(url, schema)


def test_kill9_between_settling_and_writing_keeps_sink_and_dlq_exact(
    tmp_path: Path, sink: tuple[str, str | None]
) -> None:
    rng = seeded()
    feed = Feed(rng)
    data = tmp_path / "data"
    inbox = data / "inbox" / TENANT
    inbox.mkdir(parents=True)
    config = tmp_path / "ingest.yaml"
    sinks_yaml, dsn = sink
    config.write_text(CONFIG + sinks_yaml)
    # 14 files x 300 batches x 20 lines = 84k lines: enough work for three kills or more at
    # these pauses (6 files with pauses of 0.5-2 s let a run end after two kills once a file
    # restarted into the inbox was taken without a settle wait; 8 files did once the SQLite
    # sink and checkpoints got faster, 2026-12-03)
    for f in range(14):
        drop_file(inbox, f"orders-{f}.jsonl", feed.file(f"f{f}", 300))
    assert len(feed.older) > 1000

    port = free_port()
    with Crashes(lambda: ServiceProcess(data, config=config, port=port).start()) as run:
        run.kill9_at_random(rng, 8, (0.25, 1.25), lambda svc: finished(svc, inbox))
        wait_finished(run.svc, inbox, 600)
        assert run.svc.terminate() == 0
    assert run.kills >= 3

    if dsn is None:
        db = sqlite3.connect(data / "sink.db")
        rows: dict[str, Any] = dict(db.execute("SELECT entity_id, revision FROM entities"))
    else:
        rows = {e: r for e, r in pg_query(dsn, "SELECT entity_id, revision FROM entities")}
    assert rows == feed.final
    state = sqlite3.connect(data / "state.db")
    dlq = state.execute("SELECT reason, entity_id, revision FROM dlq").fetchall()
    reasons = {r for r, _, _ in dlq}
    assert reasons <= {"OLDER_REVISION"}, reasons
    got = {(e, r) for _, e, r in dlq}
    assert len(got) == len(dlq), "a DLQ row twice"
    extra, missing = got - feed.older, feed.older - got
    assert not extra and not missing, (
        f"{len(extra)} unexpected DLQ rows, e.g. {sorted(extra)[:5]}; "
        f"{len(missing)} missing, e.g. {sorted(missing)[:5]}"
    )
