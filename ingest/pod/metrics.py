"""One /metrics for the whole pod: the workers' samples merged with the control plane's own.

Each worker sends its registry's samples with its reports (`dump`); the control plane's
collector merges them at scrape time. Counters and histograms add up across workers, and a
worker that died keeps counting with its last report (its samples move to `retired`), so pod
counters never go backwards when a worker is restarted. Gauges: the pod's state, queue depth
and in-flight count are the control plane's own (it sums what workers report); a circuit
breaker shows the worst state any worker sees for that sink; `ingest_sink_up` the smallest (a
sink one worker cannot reach is not up); any other gauge the largest value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric

from ingest.metrics import Metrics

# [family name, type, help, [[sample name, labels, value], ...]] per family
Dump = list[list[Any]]
POD_OWNED = {
    "ingest_backpressure_state",
    "ingest_queue_depth",
    "ingest_in_flight",
    "ingest_control_version",  # the control plane follows the fleet for its workers
    "ingest_control_readable",
}
_BREAKER_ORDER = {"closed": 0, "half_open": 1, "open": 2}
_MIN_GAUGES = {"ingest_sink_up"}


def dump(registry: CollectorRegistry) -> Dump:
    """A registry's samples as JSON-ready lists (what a worker sends)."""
    return [
        [m.name, m.type, m.documentation, [[s.name, s.labels, s.value] for s in m.samples]]
        for m in registry.collect()
    ]


def add_dumps(into: Dump, extra: Dump) -> Dump:
    """Counters and histograms of `extra` added to `into` (a retiring worker's last dump)."""
    return _merge([into, extra], gauges=False)


def _merge(dumps: Iterable[Dump], *, gauges: bool = True) -> Dump:
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    breakers: dict[str, int] = {}  # sink -> worst state index, across sources
    for d in dumps:
        for name, kind, doc, samples in d:
            if kind == "gauge" and not gauges:
                continue
            fam = families.setdefault(name, (kind, doc, {}))[2]
            if name == "ingest_circuit_breaker_state":
                for _, labels, value in samples:
                    if value:
                        sink = labels["sink"]
                        rank = _BREAKER_ORDER.get(labels["state"], 0)
                        breakers[sink] = max(breakers.get(sink, 0), rank)
                continue
            for sname, labels, value in samples:
                key = (sname, tuple(sorted(labels.items())))
                if key not in fam:
                    fam[key] = value
                elif sname.endswith("_created"):
                    fam[key] = min(fam[key], value)
                elif kind == "gauge":
                    pick = min if name in _MIN_GAUGES else max
                    fam[key] = pick(fam[key], value)
                else:
                    fam[key] += value
    if "ingest_circuit_breaker_state" in families:
        fam = families["ingest_circuit_breaker_state"][2]
        for sink, worst in breakers.items():
            for state, rank in _BREAKER_ORDER.items():
                labels = (("sink", sink), ("state", state))
                fam[("ingest_circuit_breaker_state", labels)] = 1.0 if rank == worst else 0.0
    return [
        [name, kind, doc, [[s, dict(labels), v] for (s, labels), v in fam.items()]]
        for name, (kind, doc, fam) in families.items()
    ]


class _PodCollector:
    def __init__(self, own: CollectorRegistry, workers: Callable[[], list[Dump]]) -> None:
        self._own = own
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        own = dump(self._own)
        mine = {f[0] for f in own if f[0] in POD_OWNED}
        theirs = [[f for f in d if f[0] not in mine] for d in self._workers()]
        for name, kind, doc, samples in _merge([own, *theirs]):
            metric = Metric(name, doc, kind)
            for sname, labels, value in samples:
                metric.add_sample(sname, labels, value)
            yield metric


class PodMetrics(Metrics):
    """The control plane's Metrics: it sets the pod gauges on its own families as a single
    process would, while `registry` (what /metrics serves) merges in every worker."""

    def __init__(self, workers: Callable[[], list[Dump]]) -> None:
        super().__init__(CollectorRegistry(auto_describe=True))
        self.own_registry = self.registry
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_PodCollector(self.own_registry, workers))
        self.workers_alive = Gauge(
            "ingest_workers",
            "Pipeline worker processes of this pod, by state (alive, down).",
            ["state"],
            registry=self.own_registry,
        )
        self.worker_restarts = Counter(
            "ingest_worker_restarts",
            "Worker processes of this pod restarted after they died.",
            ["worker"],
            registry=self.own_registry,
        )
