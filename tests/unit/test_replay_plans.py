"""The replay plan state machine: no run before approval, one approval, RFA rules, resume."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.replay import plans as P
from ingest.state.sqlite import SQLiteDB


def make(estimate: int | None = 10) -> P.Plan:
    src = P.PlanSource("inbox-dropped", "inbox-dropped", estimate_records=estimate)
    return P.Plan(id="rp-0000abcd", tenant="acme-corp", start=0.0, end=10.0, sources=[src],
                  throttle=100.0, created_at=1.0, created_by="alice")


ACTIONS = st.lists(st.sampled_from(["approve", "approve_rfa", "approve_self", "start", "finish",
                                    "fail", "interrupt", "block"]), max_size=12)


def apply(plan: P.Plan, action: str) -> bool:
    """Apply an action; False when the rules refused it (the plan must then be unchanged)."""
    try:
        if action == "approve":
            P.approve(plan, user="bob", rfa=None, threshold=100, now=2.0)
        elif action == "approve_rfa":
            P.approve(plan, user="bob", rfa="RFA-1", threshold=100, now=2.0)
        elif action == "approve_self":  # the author: four eyes refuse, whatever the state
            P.approve(plan, user="alice", rfa="RFA-1", threshold=100, now=2.0)
        elif action == "start":
            P.start(plan, 3.0)
        elif action == "finish":
            P.finish(plan, 4.0)
        elif action == "fail":
            if plan.state != P.RUNNING:
                return False
            P.fail(plan, "boom")
        elif action == "interrupt":
            P.interrupt(plan)
        else:
            P.block(plan, "hold LH-1")
    except P.PlanError:
        return False
    return True


@given(ACTIONS, st.sampled_from([5, 500, None]))
@settings(max_examples=300, deadline=None)
def test_no_run_before_approval_and_one_approval(actions: list[str], est: int | None) -> None:
    plan = make(est)
    approvals = 0
    for action in actions:
        before = plan.to_dict()
        ok = apply(plan, action)
        if not ok:
            assert plan.to_dict() == before  # a refusal changes nothing
            continue
        assert action != "approve_self", "the plan's author approved it"
        if action.startswith("approve"):
            approvals += 1
        assert plan.state in P.STATES
        if plan.state in (P.RUNNING, P.COMPLETED, P.INTERRUPTED, P.FAILED, P.BLOCKED):
            assert plan.approved_by == "bob"  # never ran, finished or blocked unapproved
        if action == "approve" and (est is None or est > 100):
            raise AssertionError("a large or unknown-size replay was approved without an RFA")
    assert approvals <= 1
    if plan.state == P.COMPLETED:
        assert plan.started_at == 3.0 and plan.finished_at == 4.0


def test_refusals_say_why() -> None:
    plan = make(10)
    with pytest.raises(P.PlanError, match="not approved yet: `replayctl approve rp-0000abcd`"):
        P.start(plan, 1.0)
    with pytest.raises(P.PlanError, match="not an RFA id like RFA-1234"):
        P.approve(plan, user="a", rfa="rfa-1", threshold=5, now=1.0)
    with pytest.raises(P.PlanError, match=r"large replay \(of 10 records, threshold 5\)"):
        P.approve(plan, user="a", rfa=None, threshold=5, now=1.0)
    P.approve(plan, user="a", rfa=None, threshold=10, now=1.0)  # at the threshold: small
    assert (plan.state, plan.approved_by, plan.approved_at, plan.rfa) == ("approved", "a", 1.0,
                                                                          None)
    with pytest.raises(P.PlanError, match="already approved \\(approved by a\\); nothing"):
        P.approve(plan, user="b", rfa="RFA-2", threshold=10, now=2.0)
    assert P.start(plan, 5.0) is False
    P.finish(plan, 6.0)
    with pytest.raises(P.PlanError, match="already completed; create a new plan"):
        P.start(plan, 7.0)
    with pytest.raises(P.PlanError, match="already completed"):
        P.approve(plan, user="b", rfa="RFA-2", threshold=10, now=2.0)
    mine = make(10)
    with pytest.raises(P.PlanError, match="written by alice; four eyes: someone else approves"):
        P.approve(mine, user="alice", rfa="RFA-3", threshold=10, now=1.0)
    assert mine.state == P.PENDING and mine.approved_by is None
    unknown = make(None)
    with pytest.raises(P.PlanError, match="of unknown size"):
        P.approve(unknown, user="a", rfa=None, threshold=10**9, now=1.0)


@given(st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=8),
       st.integers(min_value=0, max_value=7))
@settings(max_examples=100, deadline=None)
def test_resume_keeps_counts(batches: list[int], stop_after: int) -> None:
    """Interrupted after some batches, stored, loaded, resumed: totals as one run's."""
    plan = make(sum(batches))
    P.approve(plan, user="a", rfa="RFA-1", threshold=0, now=1.0)
    assert P.start(plan, 2.0) is False
    prog = plan.progress.setdefault("inbox-dropped", P.Progress())
    cut = min(stop_after, len(batches))
    for n in batches[:cut]:
        prog.read += n
        prog.delivered += n
    P.interrupt(plan)
    loaded = P.Plan.from_dict(plan.to_dict())
    assert loaded.state == P.INTERRUPTED and loaded.records_done() == sum(batches[:cut])
    assert P.start(loaded, 9.0) is True and loaded.started_at == 2.0
    prog = loaded.progress["inbox-dropped"]
    for n in batches[cut:]:
        prog.read += n
        prog.delivered += n
    P.finish(loaded, 10.0)
    assert loaded.records_done() == sum(batches) == loaded.estimate_records


def test_sqlite_store_round_trip(tmp_path: Path) -> None:
    async def go() -> None:
        db = await SQLiteDB.open(tmp_path / "state.db")
        try:
            store = P.SQLitePlanStore(db)
            a, b = make(1), make(2)
            b.id, b.tenant, b.created_at = "rp-0000beef", "other", 5.0
            await store.save(a)
            await store.save(b)
            P.approve(a, user="x", rfa=None, threshold=10, now=3.0)
            await store.save(a)
            got = await store.get(a.id)
            assert got is not None and got.to_dict() == a.to_dict()
            assert await store.get("rp-ffffffff") is None
            assert [p.id for p in await store.list(None)] == [b.id, a.id]
            assert [p.id for p in await store.list("acme-corp")] == [a.id]
        finally:
            await db.close()

    asyncio.run(go())
