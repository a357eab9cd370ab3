"""The service's Prometheus metrics: one place, so the metrics contract is readable at a glance.

Labels are bounded: tenant and source come from configuration or routes, sink from the config,
reason from the eight ReasonCodes, outcome and state from small fixed sets.

    ingest_records_total{tenant,source,outcome}  every record once, at its end:
        delivered (durable in all its sinks) | duplicate | dlq | dropped (brownout)
    ingest_dlq_total{tenant,source,reason}       records sent to the DLQ, once per record (a
        record failing two sinks counts once, with the reason of its first failure)
    ingest_sink_failures_total{tenant,source,sink,reason}  DLQ entries per failing sink
    ingest_retry_total{tenant,sink,reason}       records sent again after a retryable failure
    ingest_lag_seconds{tenant,source,sink}       histogram: source event time -> sink commit
    ingest_backpressure_state{state}             1 for the current state, 0 for the others
    ingest_circuit_breaker_state{sink,state}     1 for the breaker's current state
    ingest_sink_writes_total{sink,result}        applied | unchanged | failed, per record
    ingest_queue_depth, ingest_in_flight         admission inputs
    ingest_adapter_lag_seconds{adapter}          the same figure as /health/detailed lag_seconds
    ingest_source_errors_total{adapter}          errors a source reported (connection, auth, ...)
    ingest_source_restarts_total{adapter}        runner restarts after an unexpected error
    ingest_source_stalled{adapter}               1 while pending work has not moved for
        health.stall_after_seconds
    ingest_poison_isolations_total{stage}        batches split to isolate a record that raised
    ingest_sink_up{sink}                         1 when the sink's last active probe answered
    ingest_disk_free_bytes, ingest_disk_low_watermark_bytes   free space under data_dir and
        the level below which webhook intake is refused
    ingest_disk_full                             1 while a write waits for disk space
    ingest_auth_failures_total{surface,error}    refused credentials: surface webhook | admin,
        error one of the 401/403 codes in docs/security.md
    ingest_audit_write_failures_total            audit rows that could not be stored (logged)
    ingest_control_version{view}                 fleet control record: desired | applied version
    ingest_control_readable                      1 while the control record can be read
    ingest_replay_*{tenant,plan}                 replay progress from the plan store
                                                 (ingest/replay/metrics.py)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Fine below 2 s (the steady-load target is p95 <= 1 s, bench/bench_steady.py), exact bounds
# at the SLO (60 s) and the alerts (60 s, 300 s), coarse beyond.
LAG_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1,
    1.5,
    2,
    3,
    5,
    10,
    20,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
)
BACKPRESSURE_STATES = ("normal", "throttled", "brownout", "drain", "paused")
BREAKER_STATES = ("closed", "open", "half_open")


class Metrics:
    """All metric families on one registry (a fresh registry per service instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.records = Counter(
            "ingest_records_total",
            "Records processed, by end outcome.",
            ["tenant", "source", "outcome"],
            registry=r,
        )
        self.dlq = Counter(
            "ingest_dlq_total",
            "Records sent to the DLQ (once per record).",
            ["tenant", "source", "reason"],
            registry=r,
        )
        self.sink_failures = Counter(
            "ingest_sink_failures_total",
            "DLQ entries per failing sink (a record failing two sinks counts at each).",
            ["tenant", "source", "sink", "reason"],
            registry=r,
        )
        self.retry = Counter(
            "ingest_retry_total",
            "Records retried after a retryable sink failure.",
            ["tenant", "sink", "reason"],
            registry=r,
        )
        self.lag = Histogram(
            "ingest_lag_seconds",
            "Time from the source's event time to sink commit.",
            ["tenant", "source", "sink"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.backpressure = Gauge(
            "ingest_backpressure_state",
            "Current backpressure state (1 = in force).",
            ["state"],
            registry=r,
        )
        self.breaker = Gauge(
            "ingest_circuit_breaker_state",
            "Circuit breaker state per sink (1 = current).",
            ["sink", "state"],
            registry=r,
        )
        self.sink_writes = Counter(
            "ingest_sink_writes_total",
            "Per-record results of sink writes.",
            ["sink", "result"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "ingest_queue_depth", "Records read or accepted but not yet committed.", registry=r
        )
        self.in_flight = Gauge("ingest_in_flight", "Batches in sinks right now.", registry=r)
        self.adapter_lag = Gauge(
            "ingest_adapter_lag_seconds",
            "Per-adapter lag, as in /health/detailed.",
            ["adapter"],
            registry=r,
        )
        self.auth_failures = Counter(
            "ingest_auth_failures_total",
            "Requests refused for their credential (401/403).",
            ["surface", "error"],
            registry=r,
        )
        self.audit_failures = Counter(
            "ingest_audit_write_failures_total",
            "Audit rows that could not be stored (each is in the log instead).",
            registry=r,
        )
        self.source_errors = Counter(
            "ingest_source_errors_total",
            "Errors reported by source adapters.",
            ["adapter"],
            registry=r,
        )
        self.source_restarts = Counter(
            "ingest_source_restarts_total",
            "Source runner restarts after an unexpected error.",
            ["adapter"],
            registry=r,
        )
        self.source_stalled = Gauge(
            "ingest_source_stalled",
            "1 while a source has pending work that has not moved for the stall time.",
            ["adapter"],
            registry=r,
        )
        self.isolations = Counter(
            "ingest_poison_isolations_total",
            "Batches split to isolate records that made the code raise.",
            ["stage"],
            registry=r,
        )
        self.sink_up = Gauge(
            "ingest_sink_up", "1 when the sink's last active probe answered.", ["sink"], registry=r
        )
        self.disk_free = Gauge(
            "ingest_disk_free_bytes", "Free bytes on the data directory's filesystem.", registry=r
        )
        self.disk_low = Gauge(
            "ingest_disk_low_watermark_bytes",
            "Free space below which webhook intake is refused (reserve for the pipeline).",
            registry=r,
        )
        self.disk_full = Gauge(
            "ingest_disk_full", "1 while a write waits for disk space.", registry=r
        )
        self.control_version = Gauge(
            "ingest_control_version",
            "Fleet control record version: desired (last read from the store) and applied "
            "(by this process); they differ while a change is being followed.",
            ["view"],
            registry=r,
        )
        self.control_readable = Gauge(
            "ingest_control_readable",
            "1 while this process can read the fleet control record (0: keeps its state).",
            registry=r,
        )
        self.set_backpressure("normal")

    def set_backpressure(self, state: str) -> None:
        for s in BACKPRESSURE_STATES:
            self.backpressure.labels(s).set(1 if s == state else 0)

    def set_control(self, desired: int | None, applied: int, readable: bool) -> None:
        if desired is not None:
            self.control_version.labels("desired").set(desired)
        self.control_version.labels("applied").set(applied)
        self.control_readable.set(1 if readable else 0)

    def set_breaker(self, sink: str, state: str) -> None:
        for s in BREAKER_STATES:
            self.breaker.labels(sink, s).set(1 if s == state else 0)

    def declare_source(self, adapter: str) -> None:
        """Create an adapter's series so alerts and dashboards see it before any event."""
        self.source_errors.labels(adapter)
        self.source_restarts.labels(adapter)
        self.source_stalled.labels(adapter).set(0)

    def declare_sink(self, sink: str) -> None:
        """Create a sink's series so dashboards see it before any event."""
        self.set_breaker(sink, "closed")
        self.sink_up.labels(sink).set(1)
        for result in ("applied", "unchanged", "failed"):
            self.sink_writes.labels(sink, result)


def observe_many(child: Histogram, value: float, n: int) -> None:
    """Record `n` observations of one value (a batch shares its event time) in O(1).

    prometheus-client has no bulk observe; this adds n to the value's bucket and n*value to
    the sum, exactly what n calls of `observe(value)` do, and falls back to those calls if the
    client's internals ever change.
    """
    buckets = getattr(child, "_buckets", None)
    bounds = getattr(child, "_upper_bounds", None)
    total = getattr(child, "_sum", None)
    if buckets is None or bounds is None or total is None:
        for _ in range(n):
            child.observe(value)
        return
    total.inc(value * n)
    for i, bound in enumerate(bounds):
        if value <= bound:
            buckets[i].inc(n)
            break
