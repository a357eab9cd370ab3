"""Kafka read limit: how fast confluent-kafka itself consumes, next to what KafkaSource yields.

Measured in one run, on one fresh 6-partition topic of N small JSON records (default 1M):
  produce   confluent-kafka producer, acks=all, idempotent (context: the intake's settings)
  raw       a bare Consumer in a fresh group, consume(10_000) in a loop, no processing: the
            physical limit of one Python process reading this broker
  source    KafkaSource.batches() in a fresh group (builds RawRecords: JSON parse for the
            tenant, bookkeeping), committing every batch; printed as a ratio of `raw`

Needs the test broker: scripts/services/kafka.sh start && source $INGEST_RUN_DIR/kafka.env

    uv run python bench/bench_kafka_raw.py [--records 1000000] [--no-source]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.config import KafkaSourceConfig
from ingest.sources.kafka import KafkaSource

PARTITIONS = 6


def record(i: int) -> bytes:
    return orjson.dumps(
        {"schema_version": 3, "tenant_id": f"t{i % 10}", "entity_type": "order",
         "entity_id": str(i), "revision": 1, "occurred_at": "2026-01-01T00:00:00Z",
         "attributes": {"amount": i % 1000}}
    )  # fmt: skip


def produce(brokers: str, topic: str, n: int) -> float:
    p = Producer({"bootstrap.servers": brokers, "acks": "all", "enable.idempotence": True,
                  "linger.ms": 20, "batch.size": 1_000_000, "compression.type": "lz4",
                  "queue.buffering.max.messages": 500_000})  # fmt: skip
    t0 = time.perf_counter()
    for i in range(n):
        while True:
            try:
                p.produce(topic, record(i), key=str(i).encode())
                break
            except BufferError:
                p.poll(0.05)
        if i % 10_000 == 0:
            p.poll(0)
    left = p.flush(120)
    if left:
        raise SystemExit(f"{left} messages undelivered")
    return time.perf_counter() - t0


def consume_raw(brokers: str, topic: str, n: int) -> float:
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"bench-raw-{uuid.uuid4().hex[:6]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "group.protocol": "classic"})  # fmt: skip
    c.subscribe([topic])
    got = 0
    t0: float | None = None
    while got < n:
        msgs = c.consume(10_000, 1.0)
        if msgs and t0 is None:
            t0 = time.perf_counter()  # from the first message: excludes the group join
        got += sum(1 for m in msgs if m.error() is None)
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    c.close()
    return elapsed


async def consume_source(brokers: str, topic: str, n: int) -> float:
    cfg = KafkaSourceConfig(brokers=brokers, topics=[topic], batch_size=2000,
                            group_id=f"bench-src-{uuid.uuid4().hex[:6]}")  # fmt: skip
    src = KafkaSource(cfg)
    await src.start()
    got = 0
    t0: float | None = None
    async for batch in src.batches():
        if t0 is None:
            t0 = time.perf_counter()
        got += len(batch.records)
        await src.commit(batch)
        if got >= n:
            break
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    await src.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--no-source", action="store_true", help="skip the KafkaSource pass")
    args = ap.parse_args()
    brokers = os.environ.get("INGEST_TEST_KAFKA_BROKERS")
    if not brokers:
        raise SystemExit("INGEST_TEST_KAFKA_BROKERS is not set: run scripts/services/kafka.sh "
                         "start and source $INGEST_RUN_DIR/kafka.env")  # fmt: skip
    n = args.records
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": brokers})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)
    try:
        size = len(record(n // 2))
        t = produce(brokers, topic, n)
        print(f"produce  {n:>9,} records ({size} B each) in {t:6.2f} s = {n / t:>9,.0f} records/s")
        t = consume_raw(brokers, topic, n)
        raw = n / t
        print(f"raw      {n:>9,} records in {t:6.2f} s = {raw:>9,.0f} records/s (confluent-kafka)")
        if not args.no_source:
            t = asyncio.run(consume_source(brokers, topic, n))
            rate = n / t
            print(f"source   {n:>9,} records in {t:6.2f} s = {rate:>9,.0f} records/s "
                  f"(KafkaSource, commit per batch) = {rate / raw:.0%} of raw")  # fmt: skip
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)


if __name__ == "__main__":
    main()
