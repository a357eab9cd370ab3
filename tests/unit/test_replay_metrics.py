"""Replay progress, ETA and RTO risk (plans.progress_view) and their export on /metrics."""

from __future__ import annotations

import math
import re
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from ingest.replay import plans as P
from ingest.replay import render as V
from ingest.replay.metrics import ReplayCollector

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


def plan(
    *,
    state: str = P.RUNNING,
    estimates: tuple[int | None, ...] = (1000,),
    done: tuple[int, ...] = (0,),
    started: float | None = T0,
    rto: float | None = 3600.0,
    throttle: float = 100.0,
) -> P.Plan:
    sources = [P.PlanSource(f"s{i}", "s3", estimate_records=e) for i, e in enumerate(estimates)]
    p = P.Plan("rp-0000abcd", "acme-corp", T0 - 86400, T0, sources, throttle, T0 - 60, "op")
    p.state, p.started_at, p.rto_seconds = state, started, rto
    for s, n in zip(sources, done, strict=True):
        p.progress[s.name] = P.Progress(read=n, delivered=n - n // 10, duplicate=n // 10)
    return p


def test_linear_projection_and_risk() -> None:
    p = plan(done=(250,))  # a quarter in 15 minutes: 45 more, 60 in all: on the edge
    v = P.progress_view(p, T0 + 900)
    assert v.ratio == 0.25 and v.duration_seconds == 900
    assert v.eta_seconds == 2700 and v.at_risk is False
    v = P.progress_view(p, T0 + 1200)  # same progress 20 minutes in: 80 minutes in all
    assert v.eta_seconds == 3600 and v.at_risk is True
    assert v.needs_seconds == 10  # 1000 records at 100/s


def test_not_moving_is_infinite_and_unknown_size_counts_duration_only() -> None:
    for state in (P.INTERRUPTED, P.FAILED, P.BLOCKED):
        v = P.progress_view(plan(state=state, done=(10,)), T0 + 60)
        assert v.eta_seconds == math.inf and v.at_risk is True
    fresh = P.progress_view(plan(done=(0,)), T0 + 10)
    assert fresh.eta_seconds is None and fresh.at_risk is None  # too early to tell
    stuck = P.progress_view(plan(done=(0,)), T0 + P.NO_PROGRESS_GRACE + 1)
    assert stuck.eta_seconds == math.inf and stuck.at_risk is True
    kafka = plan(estimates=(None,), done=(500,))
    kafka.sources[0].kind = "kafka"
    assert P.progress_view(kafka, T0 + 60).ratio is None
    assert P.progress_view(kafka, T0 + 60).at_risk is None
    assert P.progress_view(kafka, T0 + 3601).at_risk is True
    assert P.progress_view(plan(rto=None, done=(1,)), T0 + 99999).at_risk is None
    assert P.progress_view(plan(state=P.APPROVED, started=None), T0).duration_seconds is None


def test_objects_without_record_estimates_count_finished_objects() -> None:
    p = plan(estimates=(None,), done=(0,))
    p.sources[0].estimate_objects = 4
    p.progress["s0"].items_done = ["a#1", "b#1"]
    assert P.progress_ratio(p) == 0.5


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 10_000), min_size=1, max_size=4),
    shares=st.lists(st.floats(0, 1), min_size=4, max_size=4),
)
def test_ratio_is_the_share_of_records_done(sizes: list[int], shares: list[float]) -> None:
    done = tuple(int(n * s) for n, s in zip(sizes, shares, strict=False))
    p = plan(estimates=tuple(sizes), done=done)
    ratio = P.progress_ratio(p)
    assert ratio is not None and 0 <= ratio <= 1
    total = sum(sizes)
    if total:
        assert math.isclose(ratio, sum(done) / total, abs_tol=1e-9)
    p.state = P.COMPLETED
    assert P.progress_ratio(p) == 1.0


async def test_collector_exports_what_the_alert_reads() -> None:
    running = plan(done=(250,))
    completed = plan(state=P.COMPLETED, done=(1000,))
    completed.id, completed.finished_at = "rp-0000beef", T0 + 500
    old = plan(state=P.COMPLETED, done=(1000,))
    old.id, old.finished_at = "rp-00000old", T0 - 3 * 86400
    pending = plan(state=P.PENDING, started=None)
    pending.id = "rp-000000pe"

    class Store:
        async def list(self, tenant: str | None) -> list[P.Plan]:
            return [running, completed, old, pending]

    collector = ReplayCollector(clock=lambda: T0 + 900)
    await collector.refresh(Store())  # type: ignore[arg-type]
    reg = CollectorRegistry()
    reg.register(collector)
    text = generate_latest(reg).decode()
    lab = 'plan="rp-0000abcd",tenant="acme-corp"'
    assert f'ingest_replay_records_total{{outcome="delivered",{lab}}} 225.0' in text
    assert f'ingest_replay_records_total{{outcome="duplicate",{lab}}} 25.0' in text
    assert f"ingest_replay_progress_ratio{{{lab}}} 0.25" in text
    assert f"ingest_replay_duration_seconds{{{lab}}} 900.0" in text
    assert f"ingest_replay_eta_seconds{{{lab}}} 2700.0" in text
    assert f"ingest_replay_rto_seconds{{{lab}}} 3600.0" in text
    assert 'ingest_replay_state{plan="rp-0000abcd",state="running",tenant="acme-corp"} 1.0' in text
    assert 'plan="rp-0000beef"' in text  # completed today: still visible
    assert "rp-00000old" not in text and "rp-000000pe" not in text
    rules = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    for name in set(re.findall(r"ingest_replay_\w+", rules)):
        assert re.search(rf"^{name}\{{", text, re.M), f"{name} is in the alert, not exported"


async def test_collector_keeps_last_plans_when_the_store_fails() -> None:
    now = [T0 + 60]

    class Flaky:
        fail = False

        async def list(self, tenant: str | None) -> list[P.Plan]:
            if self.fail:
                raise OSError("connection refused")
            return [plan(done=(10,))]

    store = Flaky()
    collector = ReplayCollector(clock=lambda: now[0])
    await collector.refresh(store)  # type: ignore[arg-type]
    store.fail = True
    now[0] += 10
    await collector.refresh(store)  # type: ignore[arg-type]
    assert collector.error and "connection refused" in collector.error
    reg = CollectorRegistry()
    reg.register(collector)
    assert "rp-0000abcd" in generate_latest(reg).decode()


# -- replayctl's rendering -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("90m", 5400), ("4h", 14400), ("1h30m", 5400), ("2d", 172800), ("1.5h", 5400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert V.parse_duration(text) == seconds


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20))
def test_any_duration_text_parses_or_says_what_is_accepted(text: str) -> None:
    try:
        value = V.parse_duration(text)
    except ValueError as exc:
        assert "duration" in str(exc)
    else:
        assert math.isfinite(value) and value > 0


@settings(max_examples=200, deadline=None)
@given(
    state=st.sampled_from(list(P.STATES)),
    done=st.integers(0, 2000),
    est=st.one_of(st.none(), st.integers(0, 2000)),
    started=st.one_of(st.none(), st.floats(0, 10_000)),
    rto=st.one_of(st.none(), st.floats(1, 10_000)),
)
def test_completion_json_is_finite_and_explains_missing_eta(
    state: str, done: int, est: int | None, started: float | None, rto: float | None
) -> None:
    p = plan(state=state, estimates=(est,), done=(done,),
             started=None if started is None else T0 - started, rto=rto)
    doc = V.completion_doc(p, T0)
    orjson.loads(orjson.dumps(doc))  # no Infinity/NaN reaches JSON
    for value in doc.values():
        assert not (isinstance(value, float) and not math.isfinite(value))
    if doc["eta_seconds"] is None and state != P.COMPLETED:
        assert doc["eta_note"]
