"""KafkaIntake against the real broker: acknowledged appends, headers, failures as 503s."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from ingest.errors import StoreUnavailable
from ingest.sources.kafka import KafkaSource
from ingest.webhook.kafka import KafkaIntake
from tests.integration._fixtures_kafka import Reader, TopicFactory, source_for, started

pytestmark = pytest.mark.integration


def read_all(brokers: str, topic: str, n: int, timeout: float = 20) -> list[object]:
    """Every message of the topic via an independent plain consumer."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"{topic}-check",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    c.subscribe([topic])
    out: list[object] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            out.extend(m for m in c.consume(n, 0.5) if m.error() is None)
    finally:
        c.close()
    return out


async def test_append_returns_after_ack_with_headers_key_and_timestamp(
    brokers: str, make_topic: TopicFactory
) -> None:
    topic = make_topic(6)
    intake = KafkaIntake(brokers, topic)
    await intake.start()
    try:
        received = time.time() - 5
        lines = [orjson.dumps({"entity_id": str(i), "n": i}) for i in range(50)]
        last = await intake.append("acme", "orders-hook", lines, received)
        assert last == 49  # one key, one partition: offsets 0..49
        assert await intake.append("acme", "orders-hook", [], received) == -1
        assert await intake.backlog() == (0, None)
        # Acknowledged means readable: all there, in order, before any flush or close.
        msgs = read_all(brokers, topic, 50)
    finally:
        await intake.close()
    assert len(msgs) == 50
    assert [m.value() for m in msgs] == lines  # type: ignore[attr-defined]
    assert {m.key() for m in msgs} == {b"acme"}  # type: ignore[attr-defined]
    assert {tuple(m.headers()) for m in msgs} == {  # type: ignore[attr-defined]
        (("tenant", b"acme"), ("source", b"orders-hook"))
    }
    assert {m.timestamp()[1] for m in msgs} == {int(received * 1000)}  # type: ignore[attr-defined]


async def test_keyed_lines_spread_over_partitions_an_entity_on_one(
    brokers: str, make_topic: TopicFactory
) -> None:
    """With the door's entity keys (ingest.webhook.spread) one tenant's lines reach several
    partitions, so several workers of the consumer group, and each entity's lines share one,
    in the order sent."""
    topic = make_topic(6)
    intake = KafkaIntake(brokers, topic)
    await intake.start()
    try:
        lines = [orjson.dumps({"entity_id": str(i % 10), "n": i}) for i in range(60)]
        keys = [1000 + i % 10 for i in range(60)]
        await intake.append("acme", "orders-hook", lines, time.time(), keys)
        msgs = read_all(brokers, topic, 60)
    finally:
        await intake.close()
    assert len(msgs) == 60
    where: dict[bytes, set[int]] = {}
    for m in msgs:
        where.setdefault(m.key(), set()).add(m.partition())  # type: ignore[attr-defined]
    assert set(where) == {b"acme/%08x" % k for k in set(keys)}
    assert all(len(p) == 1 for p in where.values())  # an entity on one partition
    assert len(set().union(*where.values())) > 1  # one tenant on several
    for e in range(10):  # each entity's lines in the order sent
        mine = [orjson.loads(m.value())["n"] for m in msgs if m.key() == b"acme/%08x" % (1000 + e)]  # type: ignore[attr-defined]
        assert mine == list(range(e, 60, 10))


async def test_intake_read_back_by_kafka_source(
    brokers: str, make_topic: TopicFactory, group: str, sources: list[KafkaSource]
) -> None:
    """Production webhook mode end to end: append, then the source sees tenant and receipt."""
    topic = make_topic(6)
    intake = KafkaIntake(brokers, topic)
    await intake.start()
    received = time.time() - 30
    tenants = [f"t{i}" for i in range(8)]
    try:
        offsets = await asyncio.gather(
            *(intake.append(t, "hook", [b'{"entity_id": "%d"}' % i for i in range(25)], received)
              for t in tenants)
        )  # fmt: skip
    finally:
        await intake.close()
    assert all(o >= 24 for o in offsets)

    src = await started(source_for(brokers, topic, group, batch_size=500), sources)
    reader = Reader(src).run()
    recs = await reader.wait_records(200)
    await reader.halt()
    assert len(recs) == 200
    by_tenant: dict[str, list[int]] = {}
    for r in recs:  # the tenant comes from the header: the lines carry no tenant_id
        by_tenant.setdefault(r.tenant, []).append(int(orjson.loads(r.data)["entity_id"]))
        assert abs(r.event_time - received) < 0.002
    assert by_tenant == {t: list(range(25)) for t in tenants}  # per tenant, in order


async def test_start_fails_clearly_on_a_missing_topic(brokers: str) -> None:
    intake = KafkaIntake(brokers, "no-such-topic-ever")
    with pytest.raises(StoreUnavailable, match="no-such-topic-ever"):
        await intake.start()


async def test_undeliverable_append_raises_store_unavailable(
    brokers: str, make_topic: TopicFactory
) -> None:
    """A body the broker never acknowledges must not look accepted (HTTP 503, not 202)."""
    topic = make_topic(1)
    intake = KafkaIntake(brokers, topic, extra={"message.timeout.ms": "2000"})
    await intake.start()
    assert await intake.append("acme", "hook", [b"{}"], time.time()) == 0
    admin = AdminClient({"bootstrap.servers": brokers})
    admin.delete_topics([topic])[topic].result(timeout=30)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="delivery failed"):
        await intake.append("acme", "hook", [b"{}", b"{}"], time.time())
    assert time.monotonic() - t0 < 10
    await intake.close()
