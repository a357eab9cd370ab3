"""Three `ingest run` processes writing the same entities to Neo4j at once.

Production mode: shared Redis (idempotency) and one Postgres schema (DLQ) for all three, like
three replicas of one deployment; each worker is fed through its own inbox directory (and
source name). Revisions of every entity are dealt round-robin to the workers (worker w gets
r = w+1, w+4, ...), spread over several files each, so the same node is written by different
processes at the same time. The Neo4j sink's guard runs under the node's write lock, so the
end state must be exactly the highest revision of every entity (a tombstone for some), and
every record is accounted for: applied, or OLDER_REVISION in the DLQ — no other reason, no
Traceback in any worker's log.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e._multisink import (
    dlq_rows,
    drop,
    neo4j_cleanup,
    neo4j_counts,
    neo4j_env,
    neo4j_state,
    new_tenant,
    pending_files,
    v3,
    write_multisink_config,
)
from tests.e2e._production import drop_schema, fresh_schema, redis_with_db, shared_env, wait_for
from tests.e2e._service import ServiceProcess, metric_value

pytestmark = pytest.mark.e2e
REDIS_DB = 8
WORKERS = 3
ENTITIES = 60
TOP = 12  # revisions 1..TOP per entity
FILES_PER_WORKER = 4


@pytest.fixture()
def setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    env = shared_env()
    schema, dsn = fresh_schema(env["INGEST_TEST_POSTGRES_URL"], "ms")
    tenant = new_tenant()
    neo = neo4j_env()
    try:
        yield {
            "dsn": dsn,
            "tenant": tenant,
            "neo4j": neo,
            "redis": redis_with_db(env["INGEST_TEST_REDIS_URL"], REDIS_DB),
        }
    finally:
        neo4j_cleanup(neo, tenant)
        drop_schema(env["INGEST_TEST_POSTGRES_URL"], schema)


def test_concurrent_workers_end_at_highest_revision(tmp_path: Path, setup: dict[str, Any]) -> None:
    t, neo = setup["tenant"], setup["neo4j"]
    svcs: list[ServiceProcess] = []
    try:
        for w in range(WORKERS):
            cfg = write_multisink_config(
                tmp_path / f"w{w}.yaml",
                redis_url=setup["redis"],
                postgres_url=setup["dsn"],
                sinks=["neo4j"],
                neo4j=neo,
                sources=[
                    {"type": "inbox", "name": f"inbox-w{w}", "poll_seconds": 0.1, "batch_size": 40}
                ],
            )
            svcs.append(ServiceProcess(tmp_path / f"w{w}", cfg).start())

        # Entities e-0..e-59; every 5th ends in a tombstone at revision TOP.
        def body(e: int, r: int) -> dict[str, Any]:
            deleted = r == TOP and e % 5 == 0
            rels = [] if deleted else [("NEXT", "item", f"e-{(e + 1) % ENTITIES}")]
            return v3(
                t,
                "item",
                f"e-{e}",
                r,
                deleted=deleted,
                relations=rels,
                **({} if deleted else {"amount": float(r), "status": f"w{r % WORKERS}"}),
            )

        per_worker: list[list[list[dict[str, Any]]]] = [
            [[] for _ in range(FILES_PER_WORKER)] for _ in range(WORKERS)
        ]
        for r in range(1, TOP + 1):
            w = (r - 1) % WORKERS
            f = (r - 1) // WORKERS  # worker w's f-th file holds its f-th revision of each entity
            for e in range(ENTITIES):
                per_worker[w][f].append(body(e, r))
        # Drop file f of every worker together, so the workers overlap on the same nodes.
        for f in range(FILES_PER_WORKER):
            for w, svc in enumerate(svcs):
                drop(svc.data_dir / "inbox", t, f"{f:02d}-w{w}.jsonl", per_worker[w][f])
        total = WORKERS * FILES_PER_WORKER * ENTITIES
        assert total == ENTITIES * TOP

        wait_for(
            lambda: all(not pending_files(s.data_dir / "inbox", t) for s in svcs),
            120,
            "every worker's files committed",
        )

        want = {("item", f"e-{e}"): (TOP, e % 5 == 0) for e in range(ENTITIES)}
        assert neo4j_state(neo, t) == want
        tombstoned = sum(1 for e in range(ENTITIES) if e % 5 == 0)
        assert neo4j_counts(neo, t) == (ENTITIES - tombstoned, tombstoned)

        rows = dlq_rows(setup["dsn"])
        assert {r[1] for r in rows} <= {"OLDER_REVISION"} and {r[0] for r in rows} <= {"neo4j"}
        assert all(r[4] < TOP for r in rows)  # the top revision always wins
        assert max(Counter(r[3] for r in rows).values(), default=0) < TOP

        applied = failed = unchanged = retried = 0
        for svc in svcs:
            m = svc.metrics()
            applied += int(
                metric_value(m, "ingest_sink_writes_total", sink="neo4j", result="applied")
            )
            failed += int(
                metric_value(m, "ingest_sink_writes_total", sink="neo4j", result="failed")
            )
            unchanged += int(
                metric_value(m, "ingest_sink_writes_total", sink="neo4j", result="unchanged")
            )
            # deadlocks and MERGE races between the workers: the sink classifies them as
            # conflicts and the worker's retry layer writes those records again
            retried += int(metric_value(m, "ingest_retry_total", sink="neo4j"))
        # Every record exactly once: applied, or refused as older (one DLQ entry each); a
        # failed attempt that was retried is not a record's end.
        assert (applied, unchanged, failed - retried) == (total - len(rows), 0, len(rows))
        print(
            f"\n{WORKERS} workers, {total} records on {ENTITIES} entities: "
            f"{applied} applied, {len(rows)} OLDER_REVISION"
        )
        for svc in svcs:
            assert svc.terminate() == 0
            text = svc.log_path.read_text(errors="replace")
            assert "Traceback" not in text and "unclassified" not in text, text[-3000:]
    finally:
        for svc in svcs:
            svc.stop()
