"""Scale-out on Kafka: three `ingest run` workers in one consumer group on a 6-partition topic.

300k records (entities with several revisions, keyed by entity id so one entity's revisions
keep their order on one partition) plus poison messages (not JSON, oversized, wrong schema).
One worker is killed with -9 mid-run, a fourth joins later. At the end every valid entity is in
Postgres exactly once at its highest revision, the DLQ holds exactly the poison and
older-revision records (plus, at most, superseded records replayed after the crash or a
rebalance: the documented window, docs/architecture.md), and the runbook's
`kafka-consumer-groups.sh --describe` shows LAG 0 on every partition.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.e2e._feed import seeded
from tests.e2e._kafka import (
    KafkaFeed,
    check_dlq,
    committed_offsets,
    create_topic,
    delete_topic,
    describe_group,
    end_offsets,
    produce_keyed,
    shared_kafka,
    write_kafka_config,
)
from tests.e2e._production import (
    PrivateServer,
    dlq_lines,
    sink_rows,
    wait_for,
)
from tests.e2e._service import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]
PARTITIONS = 6




def progress(brokers: str, topic: str, group: str, ends: dict[int, int]) -> float:
    """Share of the topic the group has committed."""
    done = committed_offsets(brokers, topic, group, PARTITIONS)
    return sum(max(0, done[p]) for p in ends) / sum(ends.values())


def test_three_workers_kill9_and_join_exact_once(
    tmp_path: Path, redis_server: PrivateServer, pg_dsn: str
) -> None:
    brokers, kafka_bin = shared_kafka()
    rng = seeded("scale-out")
    topic = create_topic(brokers, PARTITIONS, "e2e-scale")
    group = f"e2e-scale-{uuid.uuid4().hex[:8]}"
    feed = KafkaFeed(rng).build(187_600)
    assert len(feed.messages) >= 300_000, len(feed.messages)
    print(f"{len(feed.messages)} messages, {len(feed.final)} entities, DLQ {dict(feed.dlq)}")
    t0 = time.monotonic()
    produce_keyed(brokers, topic, feed.messages)
    ends = end_offsets(brokers, topic)
    assert sum(ends.values()) == len(feed.messages)
    print(f"produced in {time.monotonic() - t0:.1f} s; end offsets {ends}")

    # 5,000 records/s for the fleet: the run lasts a minute however fast the machine, so the
    # kill lands mid-run (a quiet machine once finished before three pods had started)
    config = write_kafka_config(tmp_path / "ingest.yaml", redis_url=redis_server.url,
                                postgres_url=pg_dsn, brokers=brokers, topic=topic,
                                group=group, tenant_rate=5_000)  # fmt: skip
    workers = [ServiceProcess(tmp_path / f"w{i}", config) for i in range(3)]
    late = ServiceProcess(tmp_path / "w3", config)
    try:
        t0 = time.monotonic()
        for w in workers:
            w.start(wait=60)
        # mid-run: the victim owns partitions and the group is between 15% and 60% done
        wait_for(lambda: progress(brokers, topic, group, ends) >= 0.15, 240, "15% committed")
        victim = workers[0]
        owned = victim.health()["adapters"]["kafka-main"]["partitions"]
        at_kill = progress(brokers, topic, group, ends)
        victim.kill9()
        print(f"killed worker 0 (owned {sorted(owned)}) at {at_kill:.0%} committed, "
              f"{time.monotonic() - t0:.1f} s")  # fmt: skip
        assert owned, "the killed worker owned no partition"
        assert at_kill < 0.9, f"kill came too late ({at_kill:.0%} committed)"
        wait_for(lambda: progress(brokers, topic, group, ends) >= min(0.95, at_kill + 0.2),
                 240, "progress after the kill")  # fmt: skip
        late.start(wait=60)
        at_join = progress(brokers, topic, group, ends)
        print(f"worker 3 joined at {at_join:.0%} committed, {time.monotonic() - t0:.1f} s")
        alive = [*workers[1:], late]
        wait_for(lambda: committed_offsets(brokers, topic, group, PARTITIONS) == ends, 300,
                 "committed offsets == end offsets on every partition")  # fmt: skip
        print(f"all committed after {time.monotonic() - t0:.1f} s")

        # the runbook's check, as an operator runs it, while the workers are still members
        rows = describe_group(kafka_bin, brokers, group)
        assert sorted(rows) == list(range(PARTITIONS)), rows
        for p, row in rows.items():
            assert row["LAG"] == "0", row
            assert int(row["CURRENT-OFFSET"]) == int(row["LOG-END-OFFSET"]) == ends[p], row
        for w in alive:
            assert w.terminate() == 0, w.log()
    finally:
        for w in [*workers, late]:
            w.stop()
        delete_topic(brokers, topic, group)

    stored = sink_rows(pg_dsn)
    missing = set(feed.final) - set(stored)
    assert not missing, f"{len(missing)} entities missing, e.g. {sorted(missing)[:5]}"
    assert len(stored) == len(feed.final)  # exactly once: one row per entity, nothing else
    wrong = {e: (stored[e], r) for e, r in feed.final.items() if stored[e] != r}
    assert not wrong, f"{len(wrong)} at the wrong revision, e.g. {list(wrong.items())[:5]}"
    extra = check_dlq(dlq_lines(pg_dsn), feed.dlq_lines, feed.superseded)
    print(f"DLQ exact: {dict(feed.dlq)} + {extra} superseded records replayed (the window)")
