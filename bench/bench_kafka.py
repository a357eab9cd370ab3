"""Kafka -> Postgres end to end: N records (default 1M), one pod, then two pods.

Measured in one run, on the same rows and the same table layout (the sink's own DDL):
  raw      confluent-kafka's bare consume of the topic (no processing; bench_kafka_raw.py):
           the read limit of one Python process
  \\copy    `psql \\copy` of a CSV holding exactly the columns the sink stores: the write limit
  pods     `ingest run` processes (production mode: Redis checkpoints + idempotency, Postgres
           DLQ + sink) in one consumer group on a 6-partition topic; each is a pod of
           `--workers` pipeline processes (INGEST_WORKERS; default: the pod's own default, one
           per core), so on 2 cores "2 pods" is 4 pipeline processes. The pods are started on
           the EMPTY topic and wait until the group has assigned all 6 partitions. Then, by
           default, they are paused (`POST /admin/pause`: every partition paused), the N
           records are produced, and the clock starts at `POST /admin/resume`: the pipeline
           drains a backlog, as raw consume and `\\copy` do, without the bench's producer
           (~4.5 µs of CPU a message, plus the broker's) on the same cores. `--produce-during`
           is the older measure: the clock starts before producing and the producer runs
           beside the pipeline. Either way it stops when the group's committed offsets equal
           the end offsets (every record durable in Postgres).
Prints records/s, ratios to both limits, p95 lag (ingest_lag_seconds histogram, summed over
the workers), peak RSS (VmHWM) of each worker process, and CPU µs per record (user + system)
of the service (every pod's process tree), the bench's Postgres and its private Redis over
the timed part (what hardly moves with the machine's load, unlike records/s). Uses the shared
broker and Postgres (own topics, groups and schema, removed after) and a private Redis on a
free port.

    source $INGEST_RUN_DIR/all.env
    uv run python bench/bench_kafka.py [--records 1000000] [--pods 2] [--workers 1 2]
        [--produce-during]

`--workers 1 2` runs one pod of 1 worker, then one of 2 (item 2's scaling, same rows, same
minute); with `--pods 2` each is followed by two such pods.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from confluent_kafka import Consumer, ConsumerGroupState, TopicPartition
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_embedded import tree_cpu_seconds  # noqa: E402
from bench_kafka_raw import consume_raw  # noqa: E402
from bench_postgres import (  # noqa: E402
    csv_of,
    histogram,
    make_lines,
    p95,
    peak_rss_mb,
    postgres_and_redis,
    psql_copy,
)

from ingest.config import KafkaSourceConfig  # noqa: E402
from tests.e2e._auth import bearer, detailed, service_env  # noqa: E402
from tests.e2e._kafka import (  # noqa: E402
    committed_offsets,
    create_topic,
    delete_topic,
    end_offsets,
    produce_keyed,
    shared_kafka,
    write_kafka_config,
)
from tests.e2e._production import drop_schema, fresh_schema, private_redis, shared_env  # noqa: E402
from tests.e2e._service import free_port  # noqa: E402

PARTITIONS = 6
DEFAULT_BATCH: int = KafkaSourceConfig.model_fields["batch_size"].default


class Worker:
    def __init__(
        self, workdir: Path, config: Path, workers: int | None = None, code: str | None = None
    ) -> None:
        self.port = free_port()
        data = workdir / f"w{self.port}"
        data.mkdir()
        env = {**os.environ, "INGEST_DATA_DIR": str(data), **service_env(data)}
        if code is not None:  # --compare-with: the service's package from another tree
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [code, env.get("PYTHONPATH")]))
        if workers is not None:
            env["INGEST_WORKERS"] = str(workers)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingest.cli.ingest", "run", "--host", "127.0.0.1", "--port",
             str(self.port), "--log-level", "WARNING", "--config", str(config)],
            cwd=data, env=env, stdout=subprocess.DEVNULL)  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                if detailed(self.url, 2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("a worker exited at start")
            time.sleep(0.1)
        raise RuntimeError("a worker did not start")

    def partitions(self) -> int:
        return len(detailed(self.url, 10).json()["adapters"]
                   ["kafka-main"]["partitions"])  # fmt: skip

    def admin(self, action: str) -> None:
        httpx.post(f"{self.url}/admin/{action}", headers=bearer(), timeout=30).raise_for_status()

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class CommittedWatch:
    """The group's committed offsets, read without joining it, through ONE client for the
    whole wait. A new client per look (`tests.e2e._kafka.committed_offsets`) cost ~3.5 ms of
    the bench's CPU, ~6.3 ms of the broker's and 44 ms of wall clock, four times a second, on
    the cores the pods use (measured 2026-12-02, load ~10); one client: 0.5 ms, 0.3 ms, 1 ms."""

    def __init__(self, brokers: str, topic: str, group: str) -> None:
        self._consumer = Consumer(
            {"bootstrap.servers": brokers, "group.id": group, "enable.auto.commit": False}
        )
        self._tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]

    def offsets(self) -> dict[int, int]:
        return {tp.partition: tp.offset for tp in self._consumer.committed(self._tps, timeout=10)}

    def left(self, ends: dict[int, int]) -> int:
        """Records not yet committed (0 once every partition's offset is its end offset)."""
        got = self.offsets()
        return sum(end - max(0, got.get(p, 0)) for p, end in ends.items())

    def __enter__(self) -> CommittedWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._consumer.close()


def run_workers(
    n_workers: int,
    lines: list[bytes],
    prefix: str,
    brokers: str,
    redis_url: str,
    dsn: str,
    workdir: Path,
    servers: dict[str, int],
    workers_per_pod: int | None = None,
    produce_during: bool = False,
    batch_size: int | None = None,
    code: str | None = None,
) -> tuple[float, float | None, list[float], dict[str, float]]:
    topic = create_topic(brokers, PARTITIONS, f"bench-{prefix}")
    group = f"bench-{prefix}-{uuid.uuid4().hex[:6]}"
    config = write_kafka_config(workdir / f"{prefix}.yaml", redis_url=redis_url,
                                postgres_url=dsn, brokers=brokers, topic=topic, group=group,
                                table=f"entities_{prefix}",
                                batch_size=batch_size or DEFAULT_BATCH,
                                )  # fmt: skip
    workers: list[Worker] = []
    try:
        workers = [Worker(workdir, config, workers_per_pod, code) for _ in range(n_workers)]
        # every pipeline process a member holding partitions, the group stable: a pod's
        # health shows the union of its workers' partitions, all 6 once its FIRST worker
        # joined (traced: the second took its 3 partitions 0.5-1.5 s later), so a late
        # join's rebalance could fall in the timed part
        members = min(PARTITIONS, n_workers * (workers_per_pod or len(os.sched_getaffinity(0))))
        deadline = time.monotonic() + 120
        while not (
            sum(w.partitions() for w in workers) == PARTITIONS
            and group_members(brokers, group) == members
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the group did not assign all partitions")
            time.sleep(0.5)
        msgs = [(f"{prefix}-{i}".encode(), ln.replace(b'"o-', f'"{prefix}-'.encode(), 1))
                for i, ln in enumerate(lines)]  # fmt: skip
        pids = {**{f"pod{i}": w.proc.pid for i, w in enumerate(workers)}, **servers}
        before = 0
        if not produce_during:  # a backlog: produced while the pods are paused
            for w in workers:
                w.admin("pause")
            time.sleep(2)  # a pod's workers follow its control plane's record
            produce_keyed(brokers, topic, msgs)
            # a paused runner still finishes the batch it was reading (an empty topic's
            # read waits in consume()): those records are not in the timed part
            time.sleep(2)
            before = sum(
                max(0, o) for o in committed_offsets(brokers, topic, group, PARTITIONS).values()
            )
        cpu0 = {who: tree_cpu_seconds(pid) for who, pid in pids.items()}
        t0, wall0 = time.perf_counter(), time.time()
        if produce_during:
            produce_keyed(brokers, topic, msgs)
        else:
            for w in workers:
                w.admin("resume")
        ends = end_offsets(brokers, topic)
        with CommittedWatch(brokers, topic, group) as watch:
            while (left := watch.left(ends)) > 0:
                # every 0.1 s, and every 0.01 s over the last two batches: the end is seen
                # within ~0.01 s of the last commit (~0.05 s late on average before, ~1 % of a
                # 200k run), for ~25 more looks of ~0.5 ms CPU each
                time.sleep(0.01 if left <= 2 * (batch_size or DEFAULT_BATCH) else 0.1)
        elapsed = time.perf_counter() - t0
        timed = len(lines) - before
        print(f"  timed from {wall0:.3f} for {elapsed:.3f} s (wall clock: to line up with traces)")
        cpu = {who: (tree_cpu_seconds(pid) - cpu0[who]) / timed * 1e6
               for who, pid in pids.items()}  # fmt: skip
        # how many of the cores these processes kept busy: CPU s / wall s
        cpu["cores busy"] = sum(cpu.values()) * timed / 1e6 / elapsed
        hist: dict[float, float] = {}
        for w in workers:
            for b, v in histogram(w.metrics()).items():
                hist[b] = hist.get(b, 0.0) + v
        rss = [peak_rss_mb(w.proc.pid) for w in workers]
        if before:
            print(f"  ({before} records committed before the resume, not counted)")
        return timed / elapsed, p95({}, hist), rss, cpu
    finally:
        for w in workers:
            w.stop()
        delete_topic(brokers, topic, group)


def group_members(brokers: str, group: str) -> int:
    """Members of a stable group that hold partitions (0 while it rebalances)."""
    admin = AdminClient({"bootstrap.servers": brokers})
    desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    if desc.state != ConsumerGroupState.STABLE:
        return 0
    return sum(1 for m in desc.members if m.assignment.topic_partitions)


def kafka_broker_pid() -> int | None:
    """The broker `scripts/services/up.sh kafka` started (its pid file), for its CPU per
    record; None when the bench uses a broker this machine does not run."""
    pidfile = os.environ.get("INGEST_TEST_KAFKA_PIDFILE")
    if not pidfile or not Path(pidfile).exists():
        return None
    pid = int(Path(pidfile).read_text().split()[0])
    return pid if Path(f"/proc/{pid}").exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--pods", type=int, default=2, choices=(1, 2), help="1: one pod only")
    ap.add_argument("--workers", type=int, nargs="+", default=[None],
                    help="pipeline processes per pod (INGEST_WORKERS), each count in turn; "
                    "default: the pod's default (one per core)")  # fmt: skip
    ap.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[None],
        help=f"the source's batch_size, each in turn (default: the service's, {DEFAULT_BATCH})",
    )
    ap.add_argument(
        "--produce-during",
        action="store_true",
        help="start the clock before producing (the producer runs beside the pods)",
    )
    ap.add_argument(
        "--compare-with",
        metavar="DIR",
        help="also run every shape with the `ingest` package of DIR (a checkout of another "
        "commit, put first on PYTHONPATH): old and new alternate, in ABBA order per repeat",
    )
    ap.add_argument("--repeat", type=int, default=1, help="run every shape this many times")
    args = ap.parse_args()
    n = args.records
    brokers, _ = shared_kafka()
    workdir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    url = shared_env()["INGEST_TEST_POSTGRES_URL"]
    schema, dsn = fresh_schema(url, "bench_kafka")
    redis = private_redis()
    try:
        print(f"machine: {platform.node()} {os.cpu_count()} cores, Python "
              f"{platform.python_version()}, load average {os.getloadavg()}")  # fmt: skip
        lines = make_lines(n, 1)
        # the read limit: a bare consumer on a topic holding the same messages
        raw_topic = create_topic(brokers, PARTITIONS, "bench-raw")
        try:
            produce_keyed(brokers, raw_topic, [(b"k%d" % i, ln) for i, ln in enumerate(lines)])
            raw = n / consume_raw(brokers, raw_topic, n)
        finally:
            delete_topic(brokers, raw_topic)
        csv_of(lines, workdir / "rows.csv")
        copy_rate = n / psql_copy(dsn, schema, "copy_entities", workdir / "rows.csv")
        (workdir / "rows.csv").unlink()
        print(f"records:                 {n:,}")
        print(f"raw consume (limit):     {raw:,.0f} records/s (confluent-kafka, no processing)")
        print(f"psql \\copy (limit):      {copy_rate:,.0f} records/s")
        servers = postgres_and_redis(redis.port)
        broker = kafka_broker_pid()
        if broker is not None:
            servers["broker"] = broker
        print(
            "clock:                   "
            + (
                "from before producing (--produce-during)"
                if args.produce_during
                else "from resume, the N records produced while the pods were paused"
            )
        )
        shapes = ((1, "one"), (2, "two"))[: args.pods]
        codes: list[str | None] = [None]
        if args.compare_with:
            codes = [str(Path(args.compare_with).resolve()), None]
        runs = [
            (batch, per_pod, shape, code)
            for batch, per_pod, shape in itertools.product(args.batch_size, args.workers, shapes)
            for r in range(args.repeat)
            for code in (codes if r % 2 == 0 else codes[::-1])
        ]
        for i, (batch, per_pod, (k, prefix), code) in enumerate(runs):
            # each run its own topic, table and record ids: none is a duplicate of another's
            rate, lag, rss, cpu = run_workers(
                k, lines, f"{prefix}{i}", brokers, redis.url, dsn, workdir, servers,
                per_pod, args.produce_during, batch, code,
            )  # fmt: skip
            shape = f"{k} pod(s) x {per_pod or 'default'} worker(s)"
            shape += f", batch {batch}" if batch else ""
            if args.compare_with:
                shape += ", old" if code else ", new"
            print(
                f"{shape:24s} {rate:,.0f} records/s = {rate / raw:.2f}x raw, "
                f"{rate / copy_rate:.2f}x \\copy; p95 lag <= {lag} s; peak RSS "
                f"{', '.join(f'{r:.0f}' for r in rss)} MB"
            )
            busy = cpu.pop("cores busy")
            shown = ", ".join(f"{who} {us:.1f}" for who, us in cpu.items())
            print(f"  CPU µs/record:         {shown}; these processes kept {busy:.2f} cores busy")
        print(f"load average after: {os.getloadavg()}")
    finally:
        redis.close()
        drop_schema(url, schema)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
