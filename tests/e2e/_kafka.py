"""Kafka for the e2e tests: brokers, topics, keyed feeds, the runbook's tools, worker configs.

- `shared_kafka()`: (brokers, tools dir) of the shared test broker (`scripts/services/kafka.sh`).
- `private_kafka()`: a broker of our own (own INGEST_RUN_DIR and ports), so `stop-server` /
  `start-server` disturbs nobody else.
- `create_topic` / `delete_topic`, `produce_keyed` (waits for every acknowledgement).
- `describe_group(...)`: the runbook's `kafka-consumer-groups.sh --describe` run as a process.
- `end_offsets` / `committed_offsets`: cheap polling with confluent-kafka (no JVM start).
- `write_kafka_config(...)`: a production config (Redis + Postgres state, Postgres sink) with a
  Kafka source and/or a webhook source with `intake: kafka`.
- `KafkaFeed`: records keyed by entity id (all revisions of one entity on one partition), with
  poison messages, and what must result: `final`, `dlq_lines`, `superseded`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from tests.conftest import rec as rec  # re-exported for the Kafka e2e modules
from tests.e2e._feed import TENANT as TENANT  # re-exported for the Kafka e2e modules
from tests.e2e._feed import Expected, revisions
from tests.e2e._production import RUN_DIR, SCRIPTS, PrivateServer, _env_file
from tests.e2e._service import free_port

# Faster rebalances than librdkafka's defaults (3 s heartbeats, 45 s session).
FAST_GROUP = {"heartbeat.interval.ms": "500", "session.timeout.ms": "6000"}
MAX_RECORD_BYTES = 4096  # http.max_record_bytes in the configs: oversized poison is > this


# ---------------------------------------------------------------------- brokers
def shared_kafka() -> tuple[str, str]:
    """(brokers, directory of kafka-consumer-groups.sh) of the shared test broker."""
    env = _env_file(RUN_DIR / "kafka.env") if (RUN_DIR / "kafka.env").exists() else {}
    env.update({k: v for k, v in os.environ.items() if k.startswith("INGEST_TEST_KAFKA_")})
    if "INGEST_TEST_KAFKA_BROKERS" not in env or "INGEST_TEST_KAFKA_BIN" not in env:
        raise RuntimeError(
            "INGEST_TEST_KAFKA_BROKERS is not set: run `scripts/services/up.sh kafka` and "
            "source the all.env it prints"
        )
    return env["INGEST_TEST_KAFKA_BROKERS"], env["INGEST_TEST_KAFKA_BIN"]


def private_kafka() -> tuple[PrivateServer, str]:
    """A broker of our own on free ports: (server, tools dir). `server.url` is the brokers."""
    shared_kafka()  # installed and set up once by the scripts
    run_dir = Path(tempfile.mkdtemp(prefix="ingest-e2e-kafka-"))
    port, cport = free_port(), free_port()
    env = {
        **os.environ,
        "INGEST_RUN_DIR": str(run_dir),
        "INGEST_TEST_KAFKA_PORT": str(port),
        "INGEST_TEST_KAFKA_CONTROLLER_PORT": str(cport),
    }
    server = PrivateServer("kafka", run_dir, port, "", env)
    try:
        server.run("start", timeout=180)
    except BaseException:
        subprocess.run([str(SCRIPTS / "kafka.sh"), "stop"], env=env, check=False, timeout=60)
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    kenv = _env_file(run_dir / "kafka.env")
    server.url = kenv["INGEST_TEST_KAFKA_BROKERS"]
    return server, kenv["INGEST_TEST_KAFKA_BIN"]


# ---------------------------------------------------------------------- topics
def create_topic(brokers: str, partitions: int = 6, prefix: str = "e2e") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": brokers})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        t = admin.list_topics(name, timeout=5).topics.get(name)
        parts = t.partitions.values() if t is not None and t.error is None else []
        if len(parts) == partitions and all(p.leader >= 0 for p in parts):
            return name
        time.sleep(0.1)
    raise AssertionError(f"topic {name} has no leaders after 30 s")


def delete_topic(brokers: str, topic: str, group: str | None = None) -> None:
    """Best effort cleanup of a test's topic (and consumer group)."""
    admin = AdminClient({"bootstrap.servers": brokers, "socket.timeout.ms": 5000})
    try:
        admin.delete_topics([topic])[topic].result(timeout=20)
        if group:
            admin.delete_consumer_groups([group], request_timeout=10)[group].result(timeout=15)
    except Exception:  # cleanup only
        pass


def produce_keyed(brokers: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    """Produce (key, value) pairs in order, idempotent + acks=all; fail on any error."""
    p = Producer(
        {
            "bootstrap.servers": brokers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "message.max.bytes": 2_000_000,
            "queue.buffering.max.messages": 500_000,
        }
    )
    errors: list[str] = []

    def report(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err.str())

    for i, (key, value) in enumerate(messages):
        while True:
            try:
                p.produce(topic, value=value, key=key, on_delivery=report)
                break
            except BufferError:
                p.poll(0.05)
        if i % 5000 == 0:
            p.poll(0)
    assert p.flush(120) == 0, "messages still undelivered after 120 s"
    assert not errors, errors[:5]


def end_offsets(brokers: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"probe-{uuid.uuid4().hex[:6]}"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        wm = c.get_watermark_offsets
        return {p: wm(TopicPartition(topic, p), timeout=10)[1] for p in sorted(parts)}
    finally:
        c.close()


def committed_offsets(brokers: str, topic: str, group: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets (-1001 = none), read without joining the group."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": group,
                  "enable.auto.commit": False})  # fmt: skip
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def describe_group(kafka_bin: str, brokers: str, group: str) -> dict[int, dict[str, str]]:
    """Run the runbook's `kafka-consumer-groups.sh --describe` as a process: rows by partition."""
    done = subprocess.run(
        [f"{kafka_bin}/kafka-consumer-groups.sh", "--bootstrap-server", brokers,
         "--describe", "--group", group],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    rows: dict[int, dict[str, str]] = {}
    header: list[str] | None = None
    for line in done.stdout.splitlines():
        cols = line.split()
        if cols[:2] == ["GROUP", "TOPIC"]:
            header = cols
        elif header and len(cols) >= 6 and cols[0] == group:
            row = dict(zip(header, cols, strict=False))
            rows[int(row["PARTITION"])] = row
    return rows


def kcat_values(brokers: str, topic: str) -> list[tuple[str, str]]:
    """Every message of `topic` as (headers, value), read independently by `kcat`."""
    done = subprocess.run(
        ["kcat", "-b", brokers, "-C", "-t", topic, "-o", "beginning", "-e", "-q",
         "-f", "%h\t%s\n"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    out = []
    for line in done.stdout.splitlines():
        if line:
            headers, _, value = line.partition("\t")
            out.append((headers, value))
    return out


# ---------------------------------------------------------------------- config
def write_kafka_config(
    path: Path,
    *,
    redis_url: str,
    postgres_url: str,
    brokers: str,
    topic: str | None = None,
    group: str = "ingest-adapter-main",
    table: str = "entities",
    batch_size: int = 2000,
    webhook_topic: str | None = None,
    webhook_group: str | None = None,
    tenant_rate: int = 10_000_000,
) -> Path:
    """Production config: Redis + Postgres state, one Postgres sink; a Kafka source
    `kafka-main` on `topic` and/or a webhook source with `intake: kafka` on `webhook_topic`.
    `tenant_rate`: records/s per tenant across the fleet (pulled batches wait for tokens)."""
    sources: list[dict[str, Any]] = []
    if topic is not None:
        sources.append({"type": "kafka", "name": "kafka-main", "brokers": brokers,
                        "topics": [topic], "group_id": group, "batch_size": batch_size,
                        "extra": FAST_GROUP})  # fmt: skip
    if webhook_topic is not None:
        sources.append({"type": "webhook", "name": "webhook", "intake": "kafka",
                        "brokers": brokers, "topic": webhook_topic,
                        "group_id": webhook_group or f"{group}-webhooks",
                        "batch_size": batch_size})  # fmt: skip
    raw: dict[str, Any] = {
        "state": {"kind": "production", "redis_url": redis_url, "postgres_url": postgres_url},
        "sinks": [{"type": "postgres", "name": "postgres", "table": table}],
        "sources": sources,
        "http": {"max_record_bytes": MAX_RECORD_BYTES},
        "admission": {
            "default_limits": {"rate": tenant_rate, "burst": max(tenant_rate, batch_size)},
            "queue_high_watermark": 100_000_000,
            "queue_low_watermark": 1_000_000,
        },
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------- feeds
class KafkaFeed(Expected):
    """Messages keyed by entity id, and what must result (`Expected`, tests/e2e/_feed.py).

    Each entity's `revisions` are spread over the whole feed (one round per revision), so they
    fall in different batches. Poison: not JSON, over MAX_RECORD_BYTES, wrong schema (drift),
    all distinct. A replay of a `superseded` record after the higher one is stored judges it
    OLDER_REVISION (the documented window).
    """

    def __init__(self, rng: random.Random, prefix: str | None = None) -> None:
        super().__init__(rng)
        self.prefix = prefix or uuid.uuid4().hex[:6]
        self.messages: list[tuple[bytes, bytes]] = []
        self._poisoned = 0

    @property
    def dlq(self) -> Counter[str]:
        return Counter(self.dlq_lines.values())

    def build(self, n_entities: int, poison_every: int = 500) -> KafkaFeed:
        revs: dict[str, list[int]] = {}
        for e in range(n_entities):
            eid = f"{self.prefix}-{e}"
            revs[eid] = revisions(self.rng)
            self.final[eid] = max(revs[eid])
        high: dict[str, int] = {}
        n = 0
        for rnd in range(3):
            ids = [eid for eid, rs in revs.items() if len(rs) > rnd]
            self.rng.shuffle(ids)
            for eid in ids:
                r = revs[eid][rnd]
                line = json.dumps(rec(eid, r))
                self.judge(line, eid, r, high.get(eid, 0))
                high[eid] = max(high.get(eid, 0), r)
                self.messages.append((eid.encode(), line.encode()))
                n += 1
                if n % poison_every == 0:
                    self._poison(eid, n)
                elif n % 997 == 0:
                    self.messages.append(self.messages[-1])  # exact duplicate: no effect
        return self

    def _poison(self, eid: str, n: int) -> None:
        kind = self._poisoned % 3
        self._poisoned += 1
        if kind == 0:
            line, reason = '{"broken": "' + f"{eid}-{n}", "VALIDATION_FAIL"
        elif kind == 1:
            pad = "x" * (MAX_RECORD_BYTES + 100)
            line = json.dumps(rec(f"{eid}-big{n}", 1, attributes={"note": pad}))
            reason = "VALIDATION_FAIL"
        else:
            line = json.dumps(rec(f"{eid}-drift{n}", 1, attributes={"amount": "1.5"}))
            reason = "SCHEMA_DRIFT"
        self.dlq_lines[line] = reason
        self.messages.append((eid.encode(), line.encode()))


def check_dlq(got: dict[str, str], feed_dlq: dict[str, str], superseded: set[str]) -> int:
    """Exact DLQ: every expected line with its reason; anything else may only be a superseded
    record replayed after a crash or rebalance (OLDER_REVISION). Returns the extras' count."""
    missing = {ln: r for ln, r in feed_dlq.items() if got.get(ln) != r}
    assert not missing, f"{len(missing)} DLQ rows missing/wrong, e.g. {list(missing.items())[:3]}"
    extra = {ln: r for ln, r in got.items() if ln not in feed_dlq}
    assert set(extra.values()) <= {"OLDER_REVISION"}, Counter(extra.values())
    assert set(extra) <= superseded, [ln for ln in extra if ln not in superseded][:3]
    return len(extra)
