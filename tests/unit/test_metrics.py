"""observe_many is exactly n observe() calls."""

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from ingest.metrics import LAG_BUCKETS, observe_many


@settings(max_examples=50)
@given(st.lists(st.tuples(st.floats(0, 5000), st.integers(1, 50)), max_size=8))
def test_observe_many_matches_repeated_observe(obs: list[tuple[float, int]]) -> None:
    reg_a, reg_b = CollectorRegistry(), CollectorRegistry()
    a = Histogram("h", "h", buckets=LAG_BUCKETS, registry=reg_a)
    b = Histogram("h", "h", buckets=LAG_BUCKETS, registry=reg_b)
    for value, n in obs:
        observe_many(a, value, n)
        for _ in range(n):
            b.observe(value)
    samples_a = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for m in reg_a.collect() for s in m.samples if not s.name.endswith("_created")}
    samples_b = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for m in reg_b.collect() for s in m.samples if not s.name.endswith("_created")}
    assert samples_a.keys() == samples_b.keys()
    for key, value in samples_a.items():
        assert abs(value - samples_b[key]) < 1e-6 * max(1.0, abs(value))
