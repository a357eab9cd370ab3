"""One record, several sinks: `ingest run` in production mode (Redis + Postgres state) routing a
tenant's orders to Postgres, Neo4j and Typesense and its notes to Postgres only.

Servers: the shared Postgres, Redis and Neo4j (scripts/services/up.sh), and a PRIVATE Typesense
started for this module, because the outage test stops and restarts it. Each test has its own
tenant (so its own Typesense collections and Neo4j nodes) and its own Postgres schema (sink
table, DLQ). The DLQ counts are exact; the routes are:

    {tenant: T, entity_type: order, sinks: [postgres, neo4j, typesense]}
    {tenant: T, entity_type: note,  sinks: [postgres]}
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e._multisink import (
    State,
    dlq_rows,
    dlqtriage,
    drop,
    neo4j_cleanup,
    neo4j_counts,
    neo4j_env,
    neo4j_state,
    new_tenant,
    pending_files,
    pg_state,
    private_typesense,
    typesense_collections,
    typesense_state,
    v3,
    write_multisink_config,
)
from tests.e2e._production import (
    PrivateServer,
    drop_schema,
    fresh_schema,
    pg_query,
    redis_with_db,
    shared_env,
    wait_for,
)
from tests.e2e._service import ServiceProcess, metric_value

pytestmark = pytest.mark.e2e
REDIS_DB = 7
ALL3 = ("postgres", "neo4j", "typesense")


@pytest.fixture(scope="module")
def typesense() -> Iterator[PrivateServer]:
    server = private_typesense()
    try:
        yield server
    finally:
        server.close()


class Env:
    """One test's world: tenant, schema, config, service; cleans up after itself."""

    def __init__(self, tmp: Path, ts: PrivateServer, **config: Any) -> None:
        env = shared_env()
        self.pg_url = env["INGEST_TEST_POSTGRES_URL"]
        self.schema, self.dsn = fresh_schema(self.pg_url, "ms")
        self.tenant = new_tenant()
        self.neo4j = neo4j_env()
        self.ts = {"url": ts.url, "api_key": ts.env["INGEST_TEST_TYPESENSE_API_KEY"]}
        self.config = write_multisink_config(
            tmp / "ingest.yaml",
            redis_url=redis_with_db(env["INGEST_TEST_REDIS_URL"], REDIS_DB),
            postgres_url=self.dsn,
            neo4j=self.neo4j,
            typesense=self.ts,
            routes=[
                {"tenant": self.tenant, "entity_type": "order", "sinks": list(ALL3)},
                {"tenant": self.tenant, "entity_type": "note", "sinks": ["postgres"]},
            ],
            **config,
        )
        self.svc = ServiceProcess(tmp / "data", self.config)
        self.inbox = tmp / "data" / "inbox"

    def states(self) -> dict[str, State]:
        return {
            "postgres": pg_state(self.dsn, self.tenant),
            "neo4j": neo4j_state(self.neo4j, self.tenant),
            "typesense": typesense_state(self.ts, self.tenant),
        }

    def drained(self) -> bool:
        return not pending_files(self.inbox, self.tenant)

    def close(self) -> None:
        self.svc.stop()
        neo4j_cleanup(self.neo4j, self.tenant)
        drop_schema(self.pg_url, self.schema)


# Default retry and breaker settings: a sink whose breaker is open fails fast to the DLQ
# (CIRCUIT_OPEN) when other sinks of the batch still work, so it holds nothing back.
SMALL_BATCHES: dict[str, Any] = {"batch_size": 50}


@pytest.fixture()
def world(
    tmp_path: Path, typesense: PrivateServer, request: pytest.FixtureRequest
) -> Iterator[Env]:
    config = SMALL_BATCHES if "outage" in request.node.name else {}
    env = Env(tmp_path, typesense, **config)
    try:
        yield env
    finally:
        env.close()


def only(state: State, etype: str) -> dict[str, tuple[int, bool]]:
    return {eid: v for (et, eid), v in state.items() if et == etype}


def no_traceback(svc: ServiceProcess) -> None:
    text = svc.log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


# ------------------------------------------------------------------------ 1. routing
def test_routes_health_and_sink_labelled_metrics(world: Env) -> None:
    t = world.tenant
    world.svc.start()
    orders = [
        v3(t, "order", f"o-{i}", 1, relations=[("PLACED_BY", "customer", f"c-{i % 5}")])
        for i in range(60)
    ]
    orders += [v3(t, "order", f"o-{i}", 2, amount=2.5, status="paid") for i in range(0, 60, 3)]
    notes = [v3(t, "note", f"n-{i}", 1, status="x") for i in range(25)]
    drop(world.inbox, t, "a-orders.jsonl", orders)
    drop(world.inbox, t, "b-notes.jsonl", notes)
    wait_for(world.drained, 60, "both files committed")

    want_orders = {f"o-{i}": (2 if i % 3 == 0 else 1, False) for i in range(60)}
    want_notes = {f"n-{i}": (1, False) for i in range(25)}
    s = world.states()
    assert only(s["postgres"], "order") == want_orders
    assert only(s["postgres"], "note") == want_notes
    assert s["neo4j"] == {("order", k): v for k, v in want_orders.items()}  # no notes
    assert s["typesense"] == {("order", k): v for k, v in want_orders.items()}
    assert typesense_collections(world.ts, t) == [f"{t}__order"]  # no note collection
    assert dlq_rows(world.dsn) == []

    # ok once every part says so (a pod's workers report every second)
    deadline = time.monotonic() + 15
    while (h := world.svc.health())["status"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert h["mode"] == "production" and h["status"] == "ok", h["problems"]
    assert set(h["sinks"]) == set(ALL3)
    for name in ALL3:
        sink = h["sinks"][name]
        assert sink["kind"] == name and sink["state"] == "closed", sink
        assert sink["connection"]["connected"] is True, sink
    assert h["sinks"]["typesense"]["connection"]["target"] == world.ts["url"]
    assert h["sinks"]["neo4j"]["connection"]["target"] == world.neo4j["uri"]

    m = world.svc.metrics()
    # 80 order records (60 + 20 newer revisions) reach three sinks; 25 notes reach Postgres.
    for sink, n in (("postgres", 105), ("neo4j", 80), ("typesense", 80)):
        assert metric_value(m, "ingest_sink_writes_total", sink=sink, result="applied") == n
        assert metric_value(m, "ingest_lag_seconds_count", tenant=t, sink=sink) == n
        assert metric_value(m, "ingest_sink_writes_total", sink=sink, result="failed") == 0
    assert metric_value(m, "ingest_records_total", tenant=t, outcome="delivered") == 105
    assert "ingest_lag_seconds_bucket{" in m and 'sink="typesense"' in m
    assert world.svc.terminate() == 0
    no_traceback(world.svc)


# ------------------------------------------------------------------------ 2. Typesense down
def test_typesense_outage_then_redrive(world: Env, typesense: PrivateServer) -> None:
    t = world.tenant
    world.svc.start()
    want: dict[str, tuple[int, bool]] = {}

    def feed(prefix: str) -> int:
        """8 files x (50 orders: revision 1, or 1, 2, 3 for a third; + 10 notes); returns
        the number of order records (those routed to Typesense)."""
        n_orders = 0
        for f in range(8):
            recs = []
            for i in range(50):
                eid = f"{prefix}-{f}-{i}"
                revs = [1, 2, 3] if i % 3 == 0 else [1]
                recs += [v3(t, "order", eid, r, status=f"s{r}") for r in revs]
                want[eid] = (revs[-1], False)
            n_orders += len(recs)
            recs += [v3(t, "note", f"n{prefix}-{f}-{i}", 1) for i in range(10)]
            drop(world.inbox, t, f"{prefix}{f}-mixed.jsonl", recs)
        return n_orders

    def landed() -> bool:
        return len(only(pg_state(world.dsn, t), "order")) == len(want) and len(
            neo4j_state(world.neo4j, t)
        ) == len(want)

    # Baseline with every sink up: the same feed shape, timed until in Postgres and Neo4j.
    t0 = time.monotonic()
    feed("b")
    wait_for(landed, 120, "baseline orders in Postgres and Neo4j", 0.1)
    baseline_s = time.monotonic() - t0
    wait_for(world.drained, 60, "baseline committed")
    assert len(typesense_state(world.ts, t)) == len(want)

    typesense.run("stop-server")
    restarted = False
    try:
        t0 = time.monotonic()
        outage_orders = feed("o")
        n_out = outage_orders + 8 * 10
        wait_for(landed, 120, "orders in Postgres and Neo4j while Typesense is down", 0.1)
        landed_s = time.monotonic() - t0
        h = world.svc.health()
        assert h["sinks"]["typesense"]["connection"]["connected"] is False
        assert h["sinks"]["postgres"]["state"] == "closed"
        assert h["sinks"]["neo4j"]["state"] == "closed"
        wait_for(
            lambda: world.svc.health()["sinks"]["typesense"]["state"] in ("open", "half_open"),
            30,
            "typesense breaker open",
        )
        wait_for(world.drained, 120, "every file committed with Typesense down")
        drained_s = time.monotonic() - t0
        print(
            f"\n{n_out} records ({outage_orders} routed to typesense) in Postgres+Neo4j: "
            f"{baseline_s:.1f}s with every sink up ({n_out / baseline_s:.0f} rec/s), "
            f"{landed_s:.1f}s with Typesense down ({n_out / landed_s:.0f} rec/s); "
            f"inbox drained after {drained_s:.1f}s"
        )
        # Each batch (50 records: 2 per file here) waits for Typesense at most
        # retry.max_total_seconds (1s) before it commits, and the open breaker answers at once:
        # Postgres and Neo4j keep getting every batch, never held for 3 x 5s client timeouts.
        batches = 8 * -(-(n_out // 8) // 50)
        assert landed_s < baseline_s + batches * 1.0 + 10, (landed_s, baseline_s, batches)

        rows = dlq_rows(world.dsn)
        assert {r[0] for r in rows} == {"typesense"}
        assert {r[1] for r in rows} <= {"CONNECTION_ERROR", "CIRCUIT_OPEN"}
        assert len(rows) == outage_orders  # every order record of the outage, once
        assert Counter((r[3], r[4]) for r in rows) == Counter(
            {
                (f"o-{f}-{i}", r): 1
                for f in range(8)
                for i in range(50)
                for r in ([1, 2, 3] if i % 3 == 0 else [1])
            }
        )
        pg = pg_state(world.dsn, t)
        assert only(pg, "order") == want and len(only(pg, "note")) == 160
        assert neo4j_state(world.neo4j, t) == {("order", k): v for k, v in want.items()}

        m = world.svc.metrics()
        assert (
            metric_value(m, "ingest_sink_writes_total", sink="typesense", result="failed")
            >= outage_orders
        )
        assert (
            metric_value(m, "ingest_sink_failures_total", tenant=t, sink="typesense")
            == outage_orders
        )

        typesense.run("start-server")
        restarted = True
        wait_for(
            lambda: world.svc.health()["sinks"]["typesense"]["connection"]["connected"],
            30,
            "typesense reachable again",
        )
        # Only the baseline, kept over the restart; none of the outage's orders.
        assert len(typesense_state(world.ts, t)) == len(want) - len({r[3] for r in rows})
        by_reason = Counter(r[1] for r in rows)
        for reason in ("CONNECTION_ERROR", "CIRCUIT_OPEN"):
            r = dlqtriage(world.config, "redrive", "--tenant", t, "--reason", reason)
            assert r.returncode == 0, r.stdout + r.stderr
            said = " ".join(r.stdout.split())
            n = by_reason[reason]
            assert f"redrive: {n} entries, {n} delivered" in said, said
        assert dlq_rows(world.dsn) == []

        s = world.states()
        assert only(s["postgres"], "order") == want
        assert s["neo4j"] == {("order", k): v for k, v in want.items()}
        assert s["typesense"] == {("order", k): v for k, v in want.items()}
        assert world.svc.terminate() == 0
        no_traceback(world.svc)
    finally:
        if not restarted:
            typesense.run("start-server")


# ------------------------------------------------------------------------ 3. revisions
def test_older_revisions_and_tombstones_alike_in_all_sinks(world: Env) -> None:
    t = world.tenant
    world.svc.start()
    seq = [(3, False), (5, False), (2, False), (6, True), (4, False)]

    def body(etype: str, eid: str, rev: int, deleted: bool) -> dict[str, Any]:
        return (
            v3(t, etype, eid, rev, deleted=deleted)
            if deleted
            else v3(t, etype, eid, rev, amount=float(rev), status=f"r{rev}")
        )

    # "x-seq" (and note "n-seq"): one file per revision, each judged against stored state;
    # "x-one": all five in one file (one batch), judged in arrival order within it.
    for k, (rev, deleted) in enumerate(seq):
        drop(
            world.inbox,
            t,
            f"{k}-seq.jsonl",
            [body("order", "x-seq", rev, deleted), body("note", "n-seq", rev, deleted)],
        )
        wait_for(world.drained, 30, f"file {k} committed")
    drop(world.inbox, t, "9-one.jsonl", [body("order", "x-one", r, d) for r, d in seq])
    wait_for(world.drained, 30, "one-batch file committed")

    s = world.states()
    tomb = (6, True)
    assert s["postgres"] == {
        ("order", "x-seq"): tomb,
        ("order", "x-one"): tomb,
        ("note", "n-seq"): tomb,
    }
    assert s["neo4j"] == {("order", "x-seq"): tomb, ("order", "x-one"): tomb}
    assert s["typesense"] == {("order", "x-seq"): tomb, ("order", "x-one"): tomb}
    # Neo4j: the node itself is gone, only the :Tombstone marker (revision 6) is left.
    assert neo4j_counts(world.neo4j, t) == (0, 2)

    # rev 2 (stored 5) and rev 4 (stored 6) are OLDER_REVISION at every sink the route names.
    expected = sorted(
        [
            (sink, "OLDER_REVISION", "order", eid, rev)
            for sink in ALL3
            for eid in ("x-one", "x-seq")
            for rev in (2, 4)
        ]
        + [("postgres", "OLDER_REVISION", "note", "n-seq", rev) for rev in (2, 4)]
    )
    assert dlq_rows(world.dsn) == expected
    # ... each naming the revision it lost to: 5 for revision 2, the tombstone's 6 for 4.
    assert sorted(
        pg_query(
            world.dsn,
            "SELECT sink, entity_id, revision, (detail->>'stored_revision')::int FROM dlq",
        )
    ) == sorted((row[0], row[3], row[4], {2: 5, 4: 6}[row[4]]) for row in expected)
    m = world.svc.metrics()
    for sink in ALL3:
        assert metric_value(
            m, "ingest_sink_failures_total", tenant=t, sink=sink, reason="OLDER_REVISION"
        ) == (6 if sink == "postgres" else 4)
    # ... and each record once in ingest_dlq_total, however many sinks it failed at
    assert metric_value(m, "ingest_dlq_total", tenant=t, reason="OLDER_REVISION") == len(
        {row[2:] for row in expected}
    )
    assert world.svc.terminate() == 0
    no_traceback(world.svc)
