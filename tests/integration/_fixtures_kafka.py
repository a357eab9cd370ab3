"""Fixtures and helpers for tests against the real broker of `scripts/services/kafka.sh`.

Its fixtures are registered for the folder by tests/integration/conftest.py. Every test gets
its own topic and consumer group, so tests never see each other's messages or offsets on the
shared broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from ingest.config import KafkaSourceConfig
from ingest.records import RawRecord
from ingest.sources.base import SourceBatch
from ingest.sources.kafka import KafkaSource
from tests.conftest import require_env
from tests.conftest import until as until

# Faster rebalances than librdkafka's defaults (3 s heartbeats, 45 s session) for tests.
FAST_GROUP = {"heartbeat.interval.ms": "500", "session.timeout.ms": "6000"}


@pytest.fixture
def brokers() -> str:
    return require_env("INGEST_TEST_KAFKA_BROKERS", "kafka")


@pytest.fixture
def kafka_bin() -> str:
    return require_env("INGEST_TEST_KAFKA_BIN", "kafka")


@pytest.fixture
def group(brokers: str) -> Iterator[str]:
    """A fresh consumer group, deleted afterwards (best effort) to keep the broker tidy."""
    name = f"test-group-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(KafkaException):
        admin = AdminClient({"bootstrap.servers": brokers})
        admin.delete_consumer_groups([name], request_timeout=10)[name].result(timeout=15)


TopicFactory = Callable[[int], str]


@pytest.fixture
def make_topic(brokers: str) -> Iterator[TopicFactory]:
    """`make_topic(partitions)` creates a fresh topic; all are deleted after the test."""
    admin = AdminClient({"bootstrap.servers": brokers})
    made: list[str] = []

    def make(partitions: int = 6) -> str:
        name = f"test-{uuid.uuid4().hex[:10]}"
        admin.create_topics([NewTopic(name, partitions, 1)])[name].result(timeout=30)
        made.append(name)
        wait_for_topic(admin, name, partitions)
        return name

    yield make
    if made:
        for fut in admin.delete_topics(made).values():
            try:
                fut.result(timeout=30)
            except KafkaException as exc:  # a test may have deleted it already
                if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise


def wait_for_topic(admin: AdminClient, name: str, partitions: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        t = admin.list_topics(name, timeout=5).topics.get(name)
        parts = t.partitions.values() if t is not None and t.error is None else []
        if len(parts) == partitions and all(p.leader >= 0 for p in parts):
            return
        time.sleep(0.1)
    raise AssertionError(f"topic {name} has no leaders after 15 s")


def produce(
    brokers: str,
    topic: str,
    values: Sequence[bytes | None],
    *,
    partition: int | None = None,
    timestamp_ms: int | None = None,
    headers: list[tuple[str, bytes]] | None = None,
    key: Callable[[int], bytes] | None = None,
) -> None:
    """Produce and wait for every acknowledgement (fails the test on any delivery error)."""
    p = Producer({"bootstrap.servers": brokers, "linger.ms": 5, "enable.idempotence": True})
    errors: list[str] = []

    def report(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err.str())

    for i, v in enumerate(values):
        kwargs: dict[str, Any] = {"value": v, "on_delivery": report}
        if partition is not None:
            kwargs["partition"] = partition
        if timestamp_ms is not None:
            kwargs["timestamp"] = timestamp_ms
        if headers is not None:
            kwargs["headers"] = headers
        if key is not None:
            kwargs["key"] = key(i)
        p.produce(topic, **kwargs)
        p.poll(0)
    assert p.flush(30) == 0, "messages still undelivered after 30 s"
    assert not errors, errors


def source_for(
    brokers: str, topic: str, group: str, *, batch_size: int = 100, **kw: Any
) -> KafkaSource:
    extra = {**FAST_GROUP, **kw.pop("extra", {})}
    cfg = KafkaSourceConfig(
        name="kafka-test", brokers=brokers, topics=[topic], group_id=group,
        batch_size=batch_size, extra=extra, **kw.pop("cfg", {}),
    )  # fmt: skip
    return KafkaSource(cfg, **kw)


@dataclass
class Reader:
    """Iterates a source's `batches()` in a background task, so a test can wait for records
    without cancelling a read half way (a cancelled read would lose its messages)."""

    source: KafkaSource
    batches: list[SourceBatch] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def run(self) -> Reader:
        self.task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def _loop(self) -> None:
        async for batch in self.source.batches():
            self.batches.append(batch)

    @property
    def records(self) -> list[RawRecord]:
        return [r for b in self.batches for r in b.records]

    async def wait_records(self, n: int, timeout: float = 30) -> list[RawRecord]:
        await until(lambda: len(self.records) >= n, timeout, f"{n} records")
        return self.records

    async def halt(self) -> None:
        """`stop()` the source and wait until `batches()` has ended."""
        await self.source.stop()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)


async def started(src: KafkaSource, sources: list[KafkaSource]) -> KafkaSource:
    """`src`, started, and closed at teardown (`sources` is the fixture of that name)."""
    sources.append(src)
    await src.start()
    return src


@pytest.fixture
async def sources() -> AsyncIterator[list[KafkaSource]]:
    """Sources a test appends here are closed (leaving their group) at teardown."""
    made: list[KafkaSource] = []
    yield made
    for s in made:
        await s.close()


def describe_group(
    kafka_bin: str, brokers: str, group: str
) -> dict[tuple[str, int], dict[str, str]]:
    """Run the runbook's `kafka-consumer-groups.sh --describe` as a process; rows by partition."""
    out = subprocess.run(
        [f"{kafka_bin}/kafka-consumer-groups.sh", "--bootstrap-server", brokers,
         "--describe", "--group", group],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    rows: dict[tuple[str, int], dict[str, str]] = {}
    header: list[str] | None = None
    for line in out.splitlines():
        cols = line.split()
        if cols[:2] == ["GROUP", "TOPIC"]:
            header = cols
        elif header and len(cols) >= 6 and cols[0] == group:
            row = dict(zip(header, cols, strict=False))
            rows[(row["TOPIC"], int(row["PARTITION"]))] = row
    return rows


def run_script(*args: str) -> str:
    script = require_env("INGEST_TEST_KAFKA_SCRIPT", "kafka")
    done = subprocess.run([script, *args], capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"{script} {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout
