"""Fleet control: the record's transitions, compare-and-set, and followers applying it.

A fake in-memory store stands in for the shared store (the real ones are tested in
tests/integration/test_control_store.py); followers drive real `Admission` objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import AdmissionConfig, TenantLimits
from ingest.errors import StoreUnavailable
from ingest.pipeline.admission import Admission, BackpressureState
from ingest.pipeline.control import ControlFollower
from ingest.state.control import ControlRecord, ControlRecordMissing, transition, update


class FakeStore:
    """One shared record; `down` makes every call fail like an unreachable store."""

    kind = "fake"

    def __init__(self) -> None:
        self.rec: ControlRecord | None = ControlRecord()
        self.down = False
        self.writes = 0
        self.on_read: Callable[[], None] | None = None  # to interleave a concurrent write

    async def ensure_schema(self) -> None: ...

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("fake", "nowhere", "connection refused")

    async def read(self) -> ControlRecord:
        self._check()
        if self.rec is None:
            raise ControlRecordMissing("no row")
        rec = self.rec
        if self.on_read is not None:
            hook, self.on_read = self.on_read, None
            hook()
        return rec

    async def write(self, expected_version: int, record: ControlRecord) -> bool:
        self._check()
        assert self.rec is not None
        if self.rec.version != expected_version:
            return False
        self.rec = record
        self.writes += 1
        return True

    async def listen(self, on_change: Callable[[], None]) -> bool:
        return False

    @property
    def listening(self) -> bool:
        return False

    async def close(self) -> None: ...


def admission() -> Admission:
    return Admission(AdmissionConfig(), lambda t: TenantLimits())


def pod(store: FakeStore) -> ControlFollower:
    return ControlFollower(store, admission(), poll_seconds=0.05)  # type: ignore[arg-type]


def test_transitions_follow_admission_rules_and_bump_version() -> None:
    r0 = ControlRecord()
    r1 = transition(r0, "drain", rate=None, who="a", now=1.0)
    assert (r1.state, r1.version, r1.updated_by, r1.action) == ("drain", 1, "a", "drain")
    r2 = transition(r1, "pause", rate=None, who="b", now=2.0)
    assert r2.state == "paused" and r2.draining  # paused shows, drain stays underneath
    r3 = transition(r2, "brownout", rate=0.1, who="c", now=3.0)
    assert r3.state == "paused" and r3.brownout_rate == 0.1
    r4 = transition(r3, "resume", rate=None, who="d", now=4.0)
    assert r4.state == "normal" and r4.version == 4
    assert ControlRecord.from_json(r3.to_json()) == r3
    for bad in (0.0, 1.5, None):
        with pytest.raises(ValueError):
            transition(r0, "brownout", rate=bad, who="x", now=0)
    with pytest.raises(ValueError):
        transition(r0, "explode", rate=None, who="x", now=0)


async def test_compare_and_set_loses_no_update() -> None:
    """A write that lands between our read and our write makes us retry on top of it."""
    store = FakeStore()

    def concurrent() -> None:
        assert store.rec is not None
        store.rec = transition(store.rec, "drain", rate=None, who="other pod", now=1.0)

    store.on_read = concurrent
    rec = await update(store, lambda r: transition(r, "brownout", rate=0.3, who="me", now=2.0))
    assert rec.version == 2 and rec.draining and rec.brownout_rate == 0.3
    assert store.rec == rec


async def test_three_pods_follow_any_pods_action() -> None:
    store = FakeStore()
    pods = [pod(store) for _ in range(3)]
    await pods[0].submit("drain", rate=None, who="op via pod0")
    assert pods[0].admission.state is BackpressureState.DRAIN  # at once where it was sent
    for p in pods[1:]:
        assert p.admission.state is BackpressureState.NORMAL
        await p.sync()
        assert p.admission.state is BackpressureState.DRAIN
    await pods[1].submit("resume", rate=None, who="op via pod1")
    await pods[2].submit("brownout", rate=0.1, who="op via pod2")
    for p in pods:
        await p.sync()
        assert p.admission.state is BackpressureState.BROWNOUT
        assert p.admission.brownout_rate == 0.1
        snap = p.snapshot()
        assert snap["in_sync"] and snap["desired"]["version"] == 3
        assert snap["desired"]["updated_by"] == "op via pod2"
        assert snap["applied"]["state"] == "brownout"


async def test_store_outage_keeps_the_applied_state_and_says_so() -> None:
    store = FakeStore()
    a, b = pod(store), pod(store)
    await a.submit("pause", rate=None, who="op")
    await b.sync()
    store.down = True
    assert await b.sync() is None
    assert b.admission.state is BackpressureState.PAUSED
    err = b.snapshot()["error"]
    assert "unreadable since" in err and "keeps its applied state (paused)" in err
    with pytest.raises(StoreUnavailable):
        await a.submit("resume", rate=None, who="op")
    assert a.admission.state is BackpressureState.PAUSED  # not applied to one pod alone
    store.down = False
    store.rec = None  # the row vanished: still not a reason to resume
    await b.sync()
    assert b.admission.state is BackpressureState.PAUSED and b.snapshot()["error"]
    store.rec = a.applied
    await b.sync()
    assert b.snapshot()["error"] is None


async def test_frozen_follower_never_undoes_a_shutdown_drain() -> None:
    store = FakeStore()
    a, b = pod(store), pod(store)
    b.admission.drain()  # SIGTERM on pod b
    b.freeze()
    await a.submit("resume", rate=None, who="op")
    await b.sync()
    assert b.admission.state is BackpressureState.DRAIN


async def test_run_follows_within_a_poll_and_stops() -> None:
    store = FakeStore()
    a, b = pod(store), pod(store)
    stopping = asyncio.Event()
    task = asyncio.create_task(b.run(stopping))
    await a.submit("drain", rate=None, who="op")
    for _ in range(100):
        if b.admission.state is BackpressureState.DRAIN:
            break
        await asyncio.sleep(0.01)
    assert b.admission.state is BackpressureState.DRAIN
    stopping.set()
    await asyncio.wait_for(task, 1.0)


ACTIONS = st.sampled_from(["drain", "pause", "resume", "brownout"])


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            ACTIONS,
            st.integers(0, 2),
            st.sampled_from([0.1, 0.5, 1.0]),
            st.lists(st.integers(0, 2), max_size=3),
        ),
        max_size=20,
    )
)
def test_followers_end_where_one_process_would(
    steps: list[tuple[str, int, float, list[int]]],
) -> None:
    """Any actions through any pods, pods syncing at any moments: once all have synced,
    every pod's admission is exactly where one process given the same actions would be."""

    async def go() -> None:
        store = FakeStore()
        pods = [pod(store) for _ in range(3)]
        ref = admission()
        for action, via, rate, syncs in steps:
            await pods[via].submit(action, rate=rate if action == "brownout" else None, who="op")
            if action == "brownout":
                ref.brownout(rate)
            else:
                getattr(ref, action)()
            for i in syncs:
                await pods[i].sync()
        for p in pods:
            await p.sync()
            adm = p.admission
            assert (adm.state, adm.brownout_rate) == (ref.state, ref.brownout_rate)
            assert (adm._paused, adm._draining) == (ref._paused, ref._draining)

    asyncio.run(go())
