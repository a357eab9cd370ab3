"""A pod's one /metrics and one health over its workers; the modes a worker takes over."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from ingest.config import AdmissionConfig
from ingest.metrics import Metrics
from ingest.pipeline.admission import Admission, BackpressureState
from ingest.pod.health import merge_adapters, merge_sinks
from ingest.pod.metrics import Dump, PodMetrics, add_dumps, dump
from tests.e2e._service import metric_value

OUTCOMES = ("delivered", "duplicate", "dlq")


def worker_metrics(counts: dict[str, int], lag: float, breaker: str) -> Dump:
    m = Metrics()
    for outcome, n in counts.items():
        m.records.labels("acme", "inbox", outcome).inc(n)
    m.lag.labels("acme", "inbox", "sqlite").observe(lag)
    m.set_breaker("sqlite", breaker)
    m.queue_depth.set(123)
    return dump(m.registry)


counts = st.dictionaries(st.sampled_from(OUTCOMES), st.integers(0, 10_000), min_size=1)


@settings(max_examples=60, deadline=None)
@given(
    workers=st.lists(
        st.tuples(counts, st.floats(0, 100), st.sampled_from(["closed", "half_open", "open"])),
        min_size=1,
        max_size=4,
    ),
    dead=st.lists(counts, max_size=3),
)
def test_pod_metrics_sum_workers_and_keep_what_dead_ones_counted(
    workers: list[tuple[dict[str, int], float, str]], dead: list[dict[str, int]]
) -> None:
    live = [worker_metrics(c, lag, b) for c, lag, b in workers]
    retired: Dump = []
    for c in dead:
        retired = add_dumps(retired, worker_metrics(c, 1.0, "open"))
    pod = PodMetrics(lambda: [retired, *live])
    pod.queue_depth.set(7)
    text = generate_latest(pod.registry).decode()
    for outcome in OUTCOMES:
        want = sum(c.get(outcome, 0) for c, _, _ in workers) + sum(c.get(outcome, 0) for c in dead)
        assert metric_value(text, "ingest_records_total", outcome=outcome) == want
    assert metric_value(text, "ingest_lag_seconds_count") == len(workers) + len(dead)
    assert metric_value(text, "ingest_queue_depth") == 7  # the pod's own figure, not a sum
    worst = max((b for _, _, b in workers), key=["closed", "half_open", "open"].index)
    for state in ("closed", "half_open", "open"):
        got = metric_value(text, "ingest_circuit_breaker_state", sink="sqlite", state=state)
        assert got == (1 if state == worst else 0)  # dead workers' breakers do not count
    assert text.count("# TYPE ingest_records_total counter") == 1


def test_health_folds_adapters_and_sinks() -> None:
    def doc(status: str, lag: float, read: int, breaker: str, at: float) -> dict[str, object]:
        return {
            "adapters": {
                "inbox": {
                    "kind": "inbox",
                    "status": status,
                    "lag_seconds": lag,
                    "records_read": read,
                    "errors": [f"2026-01-01T00:00:0{read % 10}Z e{read}"],
                    "last_checkpoint": {"at": at},
                    "last_checkpoint_at": at,
                    "problem": f"commits refused ({read})" if status == "error" else None,
                }
            },
            "sinks": {"sqlite": {"state": breaker, "connection": {"connected": True}}},
        }

    docs = {"w0": doc("idle", 1.0, 5, "closed", 10.0), "w1": doc("error", 9.0, 7, "open", 20.0)}
    adapters = merge_adapters(docs)["inbox"]
    assert adapters["status"] == "error" and adapters["lag_seconds"] == 9.0
    assert adapters["records_read"] == 12 and adapters["last_checkpoint"] == {"at": 20.0}
    assert set(adapters["workers"]) == {"w0", "w1"} and len(adapters["errors"]) == 2
    # the erroring worker's reason, whichever worker came first
    assert adapters["problem"] == "commits refused (7)"
    assert adapters["workers"]["w1"]["problem"] == "commits refused (7)"
    sinks = merge_sinks(docs)["sqlite"]
    assert sinks["state"] == "open" and sinks["workers"] == {"w0": "closed", "w1": "open"}


def test_worker_takes_the_control_planes_modes() -> None:
    cfg = AdmissionConfig()
    pod, worker = (Admission(cfg, lambda t: cfg.default_limits) for _ in range(2))
    for act in (lambda: pod.brownout(0.2), pod.pause, pod.drain, pod.resume):
        act()
        worker.apply_control(pod.control())
        assert worker.state is pod.state and worker.brownout_rate == pod.brownout_rate
    assert worker.state is BackpressureState.NORMAL


def test_pod_health_keeps_each_workers_truth() -> None:
    """Issue 11: the pod's document is never better than its worst worker's."""
    from ingest.pod.health import merge_adapters, merge_disk, merge_problems, worst_status

    def doc(status: str, stalled: bool, pending: int, problems: list[dict[str, str]],
            full: bool = False) -> dict[str, Any]:
        return {
            "status": status,
            "problems": problems,
            "disk": {"full": full, "full_since": 5.0 if full else None,
                     "last_error": "sink sqlite: no space left" if full else None},
            "adapters": {"s3-main": {
                "kind": "s3", "status": "stalled" if stalled else "running", "lag_seconds": 9.0,
                "records_read": 1, "errors": [], "stalled": stalled,
                "stalled_since": 3.0 if stalled else None,
                "progress": {"pending_records": pending, "restarts": 1,
                             "seconds_since_progress": 30.0 if stalled else 1.0}}},
        }

    sick = [{"component": "store:state", "severity": "unhealthy", "message": "disk full"}]
    docs = {"w0": doc("ok", False, 2, []), "w1": doc("unhealthy", True, 5, sick, full=True)}
    assert worst_status(docs) == "unhealthy"
    assert worst_status({"w0": doc("ok", False, 0, [])}, "degraded") == "degraded"
    assert merge_problems(docs) == [{**sick[0], "worker": "w1"}]
    s3 = merge_adapters(docs)["s3-main"]
    assert s3["status"] == "stalled" and s3["stalled"] is True and s3["stalled_since"] == 3.0
    assert s3["progress"]["pending_records"] == 7 and s3["progress"]["restarts"] == 2
    assert s3["progress"]["seconds_since_progress"] == 30.0
    disk = merge_disk(docs, {"free_bytes": 10, "intake_refused": False})
    assert disk["full"] is True and disk["full_since"] == 5.0 and disk["free_bytes"] == 10


def test_a_sink_one_worker_cannot_reach_is_not_up() -> None:
    from ingest.pod.metrics import _merge

    def up(value: float) -> list[list[Any]]:
        return [["ingest_sink_up", "gauge", "up", [["ingest_sink_up", {"sink": "pg"}, value]]]]

    [[_, _, _, samples]] = _merge([up(1.0), up(0.0)])
    assert samples == [["ingest_sink_up", {"sink": "pg"}, 0.0]]


@settings(max_examples=50, deadline=None)
@given(
    pending=st.integers(0, 50),
    quarantined=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    error_lines=st.sets(st.sampled_from(["a", "b", "c"])),
)
def test_inbox_files_pending_is_the_directory_not_a_sum(
    pending: int, quarantined: list[int], error_lines: set[str]
) -> None:
    """Every worker of a pod scans the same inbox directory, so each reports all its pending
    files: the pod showed N times the truth with N workers. What each worker did itself
    (files it quarantined, records it read) still adds up; the same skipped-file line seen by
    every worker is listed once."""
    docs = {
        f"w{i}": {"adapters": {"inbox": {
            "kind": "inbox", "status": "idle", "lag_seconds": 0.0, "records_read": 1,
            "errors": [f"2026-01-01T00:00:00Z skipping acme/{e}.txt" for e in sorted(error_lines)],
            "files_pending": pending, "files_quarantined": q,
        }}}
        for i, q in enumerate(quarantined)
    }  # fmt: skip
    inbox = merge_adapters(docs)["inbox"]
    assert inbox["files_pending"] == pending
    assert inbox["files_quarantined"] == sum(quarantined)
    assert inbox["records_read"] == len(quarantined)
    assert len(inbox["errors"]) == len(error_lines)


@settings(max_examples=50, deadline=None)
@given(
    since=st.lists(st.none() | st.floats(1.7e9, 1.8e9), min_size=1, max_size=4),
    backlog=st.integers(0, 10_000),
)
def test_kafka_uncommitted_since_is_the_oldest_and_the_intake_backlog_not_a_sum(
    since: list[float | None], backlog: int
) -> None:
    """Review finding: numeric extras were summed over workers. `uncommitted_since` is a time:
    two workers waiting made a date in 2077, and a first worker's None hid the others' wait;
    it is the oldest any worker has. Each worker's webhook source counts the whole SQLite
    intake (`intake_backlog_records`), not its shard: summing showed N times the truth."""
    docs = {
        f"w{i}": {"adapters": {
            "orders": {"kind": "kafka", "status": "running", "lag_seconds": 0.0,
                       "records_read": 1, "errors": [], "uncommitted_since": s,
                       "skipped_commits": 1},
            "webhook": {"kind": "webhook", "status": "idle", "lag_seconds": 0.0,
                        "records_read": 1, "errors": [], "intake_backlog_records": backlog},
        }}
        for i, s in enumerate(since)
    }  # fmt: skip
    merged = merge_adapters(docs)
    waiting = [s for s in since if s is not None]
    assert merged["orders"]["uncommitted_since"] == (min(waiting) if waiting else None)
    assert merged["orders"]["skipped_commits"] == len(since)  # a count: still summed
    assert merged["webhook"]["intake_backlog_records"] == backlog


def test_notify_wakes_each_worker_at_once_and_skips_one_that_does_not_read() -> None:
    """`Pod.notify_webhook` writes one `notify` line to each connected worker within the
    call (no task a request), read as `ingest.pod.ipc` reads it; a worker whose socket holds
    NOTIFY_BACKLOG unread bytes, or whose connection is closing, is sent nothing (its reader
    polls). Real Unix sockets; a stand-in for the Pod's slots only."""
    import asyncio
    import socket
    from types import SimpleNamespace

    from ingest.pod import ipc
    from ingest.pod.control import NOTIFY_BACKLOG, Pod

    async def go() -> None:
        pairs = [socket.socketpair() for _ in range(3)]
        slots, readers, kept = [], [], []
        for ours, theirs in pairs:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            _, writer = await asyncio.open_unix_connection(sock=ours)
            reader, their_writer = await asyncio.open_unix_connection(sock=theirs)
            slots.append(SimpleNamespace(writer=writer))
            readers.append(reader)
            kept.append(their_writer)  # a writer dropped closes its transport
        slots.append(SimpleNamespace(writer=None))  # a worker not connected yet
        pod = SimpleNamespace(slots=slots)
        Pod.notify_webhook(pod)  # type: ignore[arg-type]
        for reader in readers:
            assert await asyncio.wait_for(ipc.recv(reader), 1) == {"type": "notify"}
        # worker 1 stops reading: what its socket cannot take waits in its writer's buffer
        slots[1].writer.write(b" " * (NOTIFY_BACKLOG * 4) + b"\n")
        assert slots[1].writer.transport.get_write_buffer_size() >= NOTIFY_BACKLOG
        slots[2].writer.close()
        Pod.notify_webhook(pod)  # type: ignore[arg-type]
        assert await asyncio.wait_for(ipc.recv(readers[0]), 1) == {"type": "notify"}
        before = slots[1].writer.transport.get_write_buffer_size()
        Pod.notify_webhook(pod)  # type: ignore[arg-type]
        assert slots[1].writer.transport.get_write_buffer_size() == before  # nothing added
        assert await asyncio.wait_for(ipc.recv(readers[0]), 1) == {"type": "notify"}
        assert await asyncio.wait_for(readers[2].read(), 1) == b""  # closed, nothing sent
        for w in [s.writer for s in slots if s.writer is not None] + kept:
            w.close()
        await asyncio.sleep(0)

    asyncio.run(go())
