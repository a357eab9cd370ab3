"""A fleet of three `ingest run` pods sharing Redis and Postgres (production state), driven
over HTTP as an operator would. Each pod runs a control plane and two worker processes, so the
control plane is what follows the fleet and hands the modes to its workers.

Control: `/admin/drain` through pod 0, `/admin/resume` through pod 1, `/admin/brownout`
through pod 2 (and a pause/resume): every pod applies each within 2 s (its
`.control.applied.after_seconds`: applied at minus written at), webhooks are refused on every
pod while drained, and `/health/detailed` shows the fleet's desired state next to each
pod's applied one.

Rate limits: one tenant limited to RATE records/s is offered three times that, each pod
getting a third; together the pods accept RATE x time (+ one burst) within 10 %, and every
accepted record lands in the sink exactly once.

The three pods are started once for the module (starting nine processes on a loaded
two-core machine is most of the cost) and the tests leave the fleet `normal`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import rec
from tests.e2e._production import (
    drop_schema,
    fresh_schema,
    pg_query,
    shared_env,
    wait_for,
    write_config,
)
from tests.e2e._service import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
RATE, BURST = 200.0, 50.0
FOLLOW_SECONDS = 2.0


@dataclass
class Fleet:
    pods: list[ServiceProcess]
    dsn: str
    limited: str  # tenant with RATE/BURST


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    env = shared_env()
    root = tmp_path_factory.mktemp("fleet")
    schema, dsn = fresh_schema(env["INGEST_TEST_POSTGRES_URL"], "e2e_fleet")
    limited = f"fleet-{uuid.uuid4().hex[:8]}"  # fresh tenant: fresh GCRA key in shared Redis
    path = write_config(
        root / "config.yaml",
        redis_url=env["INGEST_TEST_REDIS_URL"],
        postgres_url=dsn,
        batch_size=500,
        extra={
            "tenants": {limited: {"rate": RATE, "burst": BURST}},
            "fleet": {"control_poll_seconds": 1.0, "rate_limits": "fleet"},
            "workers": 2,  # each pod: a control plane and two pipeline processes
        },
    )
    pods = [ServiceProcess(root / f"pod{i}", path) for i in range(3)]
    failures: list[BaseException] = []

    def start(p: ServiceProcess) -> None:
        try:
            p.start()
        except BaseException as exc:  # reported below, after every start has ended
            failures.append(exc)

    starting = [threading.Thread(target=start, args=(p,)) for p in pods]
    try:
        for t in starting:
            t.start()
        for t in starting:
            t.join()
        if failures:
            raise failures[0]
        yield Fleet(pods, dsn, limited)
    finally:
        for p in pods:
            if p.proc is not None and p.proc.poll() is None:
                p.kill_group()  # the control plane and its workers
        drop_schema(env["INGEST_TEST_POSTGRES_URL"], schema)


def act(fleet: Fleet, via: int, action: str, **params: Any) -> dict[str, Any]:
    r = fleet.pods[via].admin(action, **params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["control"]["action"] == action
    return body


def followed(fleet: Fleet, version: int, state: str) -> list[float]:
    """Wait until every pod applied `version`; each pod's follow delay in seconds."""
    delays: dict[int, float] = {}

    def check() -> bool:
        for i, p in enumerate(fleet.pods):
            if i in delays:
                continue
            h = p.health()
            ctl = h["control"]
            if ctl["applied"]["version"] >= version:
                assert ctl["applied"]["version"] == version, ctl
                assert ctl["desired"]["state"] == state and ctl["applied"]["state"] == state
                assert h["backpressure"]["state"] == state, h["backpressure"]
                if state != "normal":  # the pod's worker processes mirror its modes
                    worker_states = {w["state"] for w in h["workers"].values()}
                    if worker_states != {state}:
                        continue  # handed over on the control plane's next tick: look again
                delays[i] = ctl["applied"]["after_seconds"]
        return len(delays) == len(fleet.pods)

    wait_for(check, 20, f"every pod at control version {version} ({state})", interval=0.1)
    return [delays[i] for i in range(len(fleet.pods))]


def test_any_pod_steers_the_whole_fleet(fleet: Fleet) -> None:
    base = fleet.pods[0].health()["control"]["desired"]["version"]
    steps = [
        (0, "drain", {}, "drain"),
        (1, "resume", {}, "normal"),
        (2, "brownout", {"rate": 0.1}, "brownout"),
        (1, "pause", {}, "paused"),
        (0, "resume", {}, "normal"),
    ]
    report = []
    for n, (via, action, params, state) in enumerate(steps, start=1):
        body = act(fleet, via, action, **params)
        assert body["state"] == state  # applied at once on the pod that was asked
        assert body["control"]["version"] == base + n
        delays = followed(fleet, base + n, state)
        report.append((action, via, delays))
        assert max(delays) <= FOLLOW_SECONDS, (action, delays)
        if state == "drain":
            for p in fleet.pods:  # drained fleet-wide: no pod takes new work
                r = p.post_webhook(fleet.limited, "webhook", json={"x": 1})
                assert r.status_code == 503 and r.json()["error"] == "drain", r.text
        if state == "brownout":
            for p in fleet.pods:
                assert p.health()["backpressure"]["brownout_rate"] == 0.1
    for action, via, delays in report:
        print(f"{action} via pod{via}: applied after " + ", ".join(f"{d:.3f}s" for d in delays))
    h = fleet.pods[2].health()["control"]
    assert h["store"] == "postgres" and h["notifications"] == "listening" and h["in_sync"]
    assert h["desired"]["updated_by"].endswith("via " + fleet.pods[0].health()["worker"])


def test_tenant_limit_holds_across_the_fleet(fleet: Fleet) -> None:
    tenant, per_request, seconds = fleet.limited, 10, 12.0
    interval = per_request / RATE  # each pod is offered the whole limit: 3x in all
    accepted: list[list[str]] = [[] for _ in fleet.pods]
    offered = [0] * len(fleet.pods)
    other_refusals: list[str] = []
    start = time.monotonic() + 0.5

    def client(i: int) -> None:
        pod = fleet.pods[i]
        with httpx.Client() as http:
            k = 0
            while True:
                at = start + k * interval
                if at - start >= seconds:
                    return
                time.sleep(max(0.0, at - time.monotonic()))
                ids = [f"p{i}-{k}-{j}" for j in range(per_request)]
                body = b"\n".join(orjson.dumps(rec(e, 1, tenant)) for e in ids)
                r = pod.post_webhook(
                    tenant, "webhook", body, content_type="application/x-ndjson", client=http
                )
                offered[i] += per_request
                if r.status_code == 202:
                    accepted[i].extend(ids)
                elif r.status_code != 429 or "over its rate" not in r.json()["reason"]:
                    other_refusals.append(f"{r.status_code} {r.text}")
                k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(fleet.pods))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = sum(len(a) for a in accepted)
    rate = (got - BURST) / seconds
    print(
        f"offered {sum(offered) / seconds:.0f} records/s over 3 pods, accepted {rate:.1f}/s "
        f"(limit {RATE:g}/s); per pod {[len(a) for a in accepted]}"
    )
    assert not other_refusals, other_refusals[:3]
    assert sum(offered) >= 2.5 * RATE * seconds  # the premise: well over the limit
    assert abs(rate - RATE) <= 0.1 * RATE
    limits = [p.health()["rate_limits"] for p in fleet.pods]
    assert all(lim["fleet_wide"] and lim["fallbacks"] == 0 for lim in limits), limits
    assert all(accepted), "every pod admits its share"
    want = {e for a in accepted for e in a}
    wait_for(
        lambda: pg_query(fleet.dsn, "SELECT count(*) FROM entities")[0][0] >= len(want),
        90,
        "every accepted record in the sink",
    )
    rows = pg_query(fleet.dsn, "SELECT entity_id FROM entities")
    assert sorted(r[0] for r in rows) == sorted(want)
