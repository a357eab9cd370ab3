"""Production mode under faults, the service run as a process against real Redis and Postgres.

State on Redis (checkpoints under exactly `checkpoint:<tenant>:<source>`, idempotency keys) and
Postgres (DLQ), entities in the Postgres sink. Private servers of this module's own (started
with scripts/services/*.sh on free ports) so stopping and restarting them disturbs nobody; each
test has its own Postgres schema and Redis database.

1. Postgres stopped mid-run: the breaker opens (health + metrics), half-opens, closes once
   Postgres is back; records wait instead of failing; exact sink and DLQ.
2. Redis restarted mid-run (no persistence: checkpoints and idempotency keys vanish): the
   service recovers by itself; records delivered again meet the revision guard, so the sink
   is not rewritten and the DLQ grows by exactly the superseded records replayed.
3. `redis-cli GET checkpoint:<tenant>:<source>` shows readable JSON and `redis-cli DEL` makes
   the source start over from the beginning of the file, with no doubles.
4. `ingest idempotency-stats --config FILE` (table and --json) counts the keys exactly.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e._feed import TENANT, Feed, drop_file
from tests.e2e._production import (
    PrivateServer,
    dlq_lines,
    fresh_schema,
    pg_query,
    private_postgres,
    private_redis,
    redis_cli,
    redis_with_db,
    sink_rows,
    wait_for,
    write_config,
)
from tests.e2e._service import ServiceProcess, ingest_cli, metric_value

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def pg() -> Iterator[PrivateServer]:
    server = private_postgres()
    yield server
    server.close()


@pytest.fixture(scope="module")
def redis() -> Iterator[PrivateServer]:
    server = private_redis()
    yield server
    server.close()


class Env:
    """One test's service: its schema, Redis db, config and data dir."""

    def __init__(
        self, tmp: Path, pg: PrivateServer, redis: PrivateServer, db: int, **config: Any
    ) -> None:
        _, self.dsn = fresh_schema(pg.url, "e2e_fault")
        self.redis_url = redis_with_db(redis.url, db)
        redis_cli(self.redis_url, "FLUSHDB")
        self.config = write_config(
            tmp / "ingest.yaml", redis_url=self.redis_url, postgres_url=self.dsn, **config
        )
        self.data = tmp / "data"
        self.inbox = self.data / "inbox" / TENANT
        self.inbox.mkdir(parents=True)
        self.svc: ServiceProcess | None = None

    def start(self) -> ServiceProcess:
        self.svc = ServiceProcess(self.data, config=self.config).start(wait=60)
        return self.svc

    def health(self) -> dict[str, Any]:
        assert self.svc is not None
        return self.svc.health(timeout=20)

    def idle(self) -> bool:
        if any(p.is_file() for p in self.inbox.iterdir()):
            return False
        return bool(self.health()["backpressure"]["queue_depth"] == 0)

    def wait_idle(self, timeout: float = 120) -> None:
        wait_for(self.idle, timeout, f"the service to finish ({self.inbox})")

    def checkpoint(self, source: str = "inbox") -> dict[str, Any] | None:
        raw = redis_cli(self.redis_url, "GET", f"checkpoint:{TENANT}:{source}")
        return json.loads(raw) if raw else None

    def stop(self) -> None:
        if self.svc is not None:
            self.svc.stop()


@pytest.fixture()
def envs() -> Iterator[list[Env]]:
    made: list[Env] = []
    yield made
    for env in made:
        env.stop()


def breaker_metric(svc: ServiceProcess, state: str) -> float:
    return metric_value(svc.metrics(), "ingest_circuit_breaker_state", sink="postgres", state=state)


# ---------------------------------------------------------------------- 1. Postgres stopped
def test_postgres_stopped_mid_run_breaker_opens_and_closes_nothing_lost(
    tmp_path: Path, pg: PrivateServer, redis: PrivateServer, envs: list[Env]
) -> None:
    env = Env(
        tmp_path,
        pg,
        redis,
        1,
        retry={
            "max_attempts": 1000,
            "base_delay_seconds": 0.2,
            "max_delay_seconds": 1.0,
            "max_total_seconds": 120,
        },
        breaker={"failure_threshold": 3, "reset_timeout_seconds": 3},
    )
    envs.append(env)
    feed = Feed(random.Random(11))
    svc = env.start()
    drop_file(env.inbox, "before.jsonl", feed.unit("before", 1500))
    env.wait_idle()
    assert env.health()["sinks"]["postgres"]["state"] == "closed"

    pg.run("stop-server")
    stopped_at = time.monotonic()
    try:
        drop_file(env.inbox, "during.jsonl", feed.unit("during", 1500))
        body = "\n".join(feed.unit("hook", 200))
        r = svc.post_webhook(TENANT, "shop", body, content_type="application/x-ndjson", timeout=20)
        assert r.status_code == 202  # the webhook intake is local: accepted while PG is down

        h = wait_for(
            lambda: (x := env.health())["sinks"]["postgres"]["state"] == "open" and x,
            60,
            "the postgres breaker to open",
        )
        # Postgres is the sink and the DLQ store: nothing can be made durable past the intake
        assert h["status"] == "unhealthy", h["problems"]
        assert {"sink:postgres", "store:postgres"} <= {p["component"] for p in h["problems"]}
        assert h["ready"] is True  # its intake is local: it keeps taking webhooks (202 above)
        assert h["sinks"]["postgres"]["connection"]["connected"] is False
        assert h["sinks"]["postgres"]["breaker"]["trips"] >= 1
        assert breaker_metric(svc, "open") == 1
        assert breaker_metric(svc, "closed") == 0
        # reset_timeout 3 s: it half-opens, the probe fails, it opens again. The worker probes
        # the moment reset_timeout ends and a refused connection fails in milliseconds, so
        # half_open is rarely seen by a poll; a second trip proves it (only a failed probe in
        # half_open re-opens the breaker while Postgres is down).
        wait_for(
            lambda: (
                (b := env.health()["sinks"]["postgres"])["state"] == "half_open"
                or b["breaker"]["trips"] >= 2
            ),
            30,
            "the breaker to half-open while Postgres is down",
        )
        wait_for(
            lambda: env.health()["sinks"]["postgres"]["breaker"]["trips"] >= 2,
            30,
            "a failed probe to re-open the breaker",
        )
        assert (env.inbox / "during.jsonl").exists()  # nothing committed: records wait
        time.sleep(max(0.0, 10 - (time.monotonic() - stopped_at)))
    finally:
        pg.run("start-server")

    env.wait_idle(180)
    wait_for(
        lambda: env.health()["sinks"]["postgres"]["state"] == "closed",
        60,
        "the breaker to close once Postgres is back",
    )
    h = env.health()
    assert h["sinks"]["postgres"]["connection"]["connected"] is True
    assert breaker_metric(svc, "closed") == 1
    assert breaker_metric(svc, "open") == 0
    m = svc.metrics()
    assert metric_value(m, "ingest_retry_total", sink="postgres", reason="CONNECTION_ERROR") > 0
    assert metric_value(m, "ingest_retry_total", sink="postgres", reason="CIRCUIT_OPEN") > 0

    # Nothing lost: every record in the sink or the DLQ, and nothing there for the outage.
    assert sink_rows(env.dsn) == feed.final
    assert dlq_lines(env.dsn) == feed.dlq_lines
    assert svc.terminate() == 0


def cross_batch_superseded(lines: list[str], superseded: set[str], batch: int) -> set[str]:
    """Superseded records whose entity's winner is in a later batch of `batch` lines: what a
    full re-read finds older than stored (same-batch ones are recognised as a replay)."""
    winner_batch: dict[str, tuple[int, int]] = {}  # entity -> (revision, batch of the winner)
    for i, line in enumerate(lines):
        try:
            body = json.loads(line)
            eid, rev = body["entity_id"], body["revision"]
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(rev, int):
            continue
        if eid not in winner_batch or rev > winner_batch[eid][0]:
            winner_batch[eid] = (rev, i // batch)
    out = set()
    for i, line in enumerate(lines):
        if line in superseded and winner_batch[json.loads(line)["entity_id"]][1] != i // batch:
            out.add(line)
    return out


# ---------------------------------------------------------------------- 2. Redis restarted
def test_redis_restart_mid_run_recovers_and_doubles_nothing(
    tmp_path: Path, pg: PrivateServer, redis: PrivateServer, envs: list[Env]
) -> None:
    env = Env(tmp_path, pg, redis, 2, batch_size=500)
    envs.append(env)
    rng = random.Random(22)
    feed_a, feed_b = Feed(rng), Feed(rng)
    lines_a = feed_a.unit("a", 2000)
    svc = env.start()
    pid = svc.proc.pid if svc.proc else None
    drop_file(env.inbox, "a.jsonl", lines_a)
    env.wait_idle()
    written_a = dict(pg_query(env.dsn, "SELECT entity_id, updated_at FROM entities"))
    assert len(written_a) == len(feed_a.final)
    run_id = redis_cli(env.redis_url, "INFO", "server")

    lines_b = feed_b.unit("b", 12_000)
    drop_file(env.inbox, "b.jsonl", lines_b)
    wait_for(
        lambda: (
            (c := env.checkpoint())
            and c["position"]["file"] == "b.jsonl"
            and c["position"]["offset"] > 0
        ),
        60,
        "reading b.jsonl to start",
    )
    redis.run("restart-server")
    info = redis_cli(env.redis_url, "INFO", "server")
    assert _field(info, "run_id") != _field(run_id, "run_id")  # a new server, empty
    env.wait_idle(180)
    assert svc.proc is not None and svc.proc.poll() is None and svc.proc.pid == pid
    h = env.health()
    assert h["stores"]["redis"]["connected"] is True
    assert h["status"] == "ok"

    # b.jsonl: everything landed; a batch re-read after the restart can only add superseded
    # records as OLDER_REVISION (revision guard), never a double or a lost record.
    final = {**feed_a.final, **feed_b.final}
    assert sink_rows(env.dsn) == final
    got = dlq_lines(env.dsn)
    expected = {**feed_a.dlq_lines, **feed_b.dlq_lines}
    assert {k: got.get(k) for k in expected} == expected
    extra_b = set(got) - set(expected)
    assert extra_b <= cross_batch_superseded(lines_b, feed_b.superseded, 500)

    # The idempotency keys of a.jsonl are gone: dropping it again delivers every record anew.
    # The revision guard stores nothing (no row rewritten). A batch whose entities' winners it
    # holds itself is recognised as a replay; a record superseded by a LATER batch is now
    # older than what is stored: exactly those become OLDER_REVISION. No row is doubled.
    drop_file(env.inbox, "a-again.jsonl", lines_a)
    env.wait_idle()
    after = dict(pg_query(env.dsn, "SELECT entity_id, updated_at FROM entities"))
    assert {k: after[k] for k in written_a} == written_a
    assert sink_rows(env.dsn) == final
    got = dlq_lines(env.dsn)
    late = cross_batch_superseded(lines_a, feed_a.superseded, 500)
    want = {**expected, **{line: "OLDER_REVISION" for line in late}}
    assert {k: v for k, v in got.items() if k not in extra_b} == want
    assert len(got) == len(want) + len(extra_b)
    assert env.checkpoint() is not None  # the checkpoint is written again after the restart
    print(f"superseded replays: b.jsonl {len(extra_b)}, a.jsonl {len(late)} of "
          f"{len(feed_a.superseded)} superseded")
    assert svc.terminate() == 0


def _field(info: str, name: str) -> str:
    for line in info.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} not in INFO output")


# ---------------------------------------------------------------------- 3. GET / DEL
def test_checkpoint_get_shows_json_and_del_starts_the_source_over(
    tmp_path: Path, pg: PrivateServer, redis: PrivateServer, envs: list[Env]
) -> None:
    env = Env(tmp_path, pg, redis, 3, batch_size=500)
    envs.append(env)
    rng = random.Random(33)
    feed = Feed(rng)
    svc = env.start()
    lines_a = feed.unit("a", 600)
    path_a = drop_file(env.inbox, "a.jsonl", lines_a)
    size_a = path_a.stat().st_size
    body = "\n".join(feed.unit("hook", 50))
    r = svc.post_webhook(TENANT, "shop", body, content_type="application/x-ndjson", timeout=20)
    assert r.status_code == 202
    env.wait_idle()

    # The runbook's `redis-cli GET "checkpoint:<tenant>:<source>"`: readable JSON.
    doc = env.checkpoint("inbox")
    assert doc is not None
    assert set(doc) == {"position", "updated_at", "worker"}
    assert doc["position"]["file"] == "a.jsonl"
    assert doc["position"]["complete"] is True
    assert doc["position"]["offset"] == size_a
    h = env.health()  # the process that wrote it: this one, or one of its pod's workers
    assert doc["worker"] in {h["worker"], *(w["id"] for w in h.get("workers", {}).values())}
    age = datetime.now(UTC) - datetime.strptime(doc["updated_at"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=UTC
    )
    assert 0 <= age.total_seconds() < 120
    hook = wait_for(lambda: env.checkpoint("shop"), 30, "the webhook checkpoint")
    assert isinstance(hook["position"]["intake_id"], int)
    keys = redis_cli(env.redis_url, "--scan", "--pattern", "checkpoint:*").split()
    assert sorted(keys) == [f"checkpoint:{TENANT}:inbox", f"checkpoint:{TENANT}:shop"]

    # Stop the service mid-file (SIGTERM drains: what was read is committed), DEL, restart:
    # the file is read again from its first line, and nothing is doubled.
    lines_b = feed.unit("b", 20_000)
    drop_file(env.inbox, "b.jsonl", lines_b)
    mid = wait_for(
        lambda: (
            (c := env.checkpoint())
            and c["position"]["file"] == "b.jsonl"
            and c["position"]["offset"] > 0
            and c
        ),
        60,
        "reading b.jsonl to start",
    )
    assert mid["position"].get("complete") is not True
    assert svc.terminate() == 0
    doc = env.checkpoint()
    assert doc is not None and doc["position"]["file"] == "b.jsonl"
    assert not doc["position"].get("complete"), "b.jsonl finished before the stop: no test"
    assert redis_cli(env.redis_url, "DEL", f"checkpoint:{TENANT}:inbox") == "1"
    assert env.checkpoint() is None

    svc = env.start()
    env.wait_idle(180)
    # This process read all of b.jsonl: every line once, from the start. (A pod's /metrics
    # folds its workers' reports, sent every second: wait for the last one.)
    wait_for(
        lambda: metric_value(svc.metrics(), "ingest_records_total", source="inbox")
        >= len(lines_b),
        15,
        "the pod's metrics to count every line of b.jsonl",
    )
    m = svc.metrics()
    assert metric_value(m, "ingest_records_total", source="inbox") == len(lines_b)
    assert metric_value(m, "ingest_records_total", source="inbox", outcome="duplicate") > 0
    assert sink_rows(env.dsn) == feed.final
    assert dlq_lines(env.dsn) == feed.dlq_lines
    doc = env.checkpoint()
    assert doc is not None and doc["position"]["file"] == "b.jsonl" and doc["position"]["complete"]

    # DEL after a file is done and drop it again: the source takes it afresh, all duplicates.
    assert redis_cli(env.redis_url, "DEL", f"checkpoint:{TENANT}:inbox") == "1"
    drop_file(env.inbox, "a.jsonl", lines_a)
    env.wait_idle()
    m2 = svc.metrics()
    before = metric_value(m, "ingest_records_total", source="inbox", outcome="duplicate")
    keyed = feed.keyed  # every line of a with a key is now a duplicate
    valid_a = sum(1 for line in lines_a if line in keyed)
    dup_after = metric_value(m2, "ingest_records_total", source="inbox", outcome="duplicate")
    assert dup_after - before == valid_a
    assert sink_rows(env.dsn) == feed.final
    assert dlq_lines(env.dsn) == feed.dlq_lines
    assert svc.terminate() == 0


# ---------------------------------------------------------------------- 4. idempotency-stats
def test_idempotency_stats_counts_the_redis_store(
    tmp_path: Path, pg: PrivateServer, redis: PrivateServer, envs: list[Env]
) -> None:
    env = Env(tmp_path, pg, redis, 4)
    envs.append(env)
    feed = Feed(random.Random(44))
    svc = env.start()
    drop_file(env.inbox, "a.jsonl", feed.unit("a", 3000))
    env.wait_idle()
    assert svc.terminate() == 0

    def cli(*args: str) -> str:
        return ingest_cli("idempotency-stats", "--config", str(env.config), *args)

    stats = json.loads(cli("--json"))
    week = 7 * 86400  # buckets as wide as the TTL, starting on days divisible by 7
    start = datetime.fromtimestamp(time.time() // week * week, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert stats["backend"] == "redis"
    assert stats["keys"] == len(feed.keyed)
    assert stats["buckets"] == 1
    assert stats["oldest_bucket"] == start
    assert stats["memory_bytes"] > 0
    assert stats["ttl_seconds"] == 7 * 86400
    n = redis_cli(env.redis_url, "GET", f"ingest_idempotency:{start[:10]}+7d:n")
    assert int(n) == len(feed.keyed)
    text = cli()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.replace("│", "|").split("|") if c.strip()]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    assert rows["keys"] == str(len(feed.keyed))
    assert rows["oldest_bucket"] == start
    assert rows["memory_bytes"] == str(stats["memory_bytes"]) or int(rows["memory_bytes"]) > 0
