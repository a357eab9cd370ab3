"""CommitTracker: checkpoints must only ever cover a contiguous, fully finished prefix."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pipeline.watermark import CommitTracker


def test_out_of_order_finish_commits_only_prefix() -> None:
    t: CommitTracker[str] = CommitTracker()
    a, b, c = "a", "b", "c"
    for x in (a, b, c):
        t.add(x)
    assert t.done(b) == []
    assert t.pending == 3
    assert t.done(a) == [a, b]
    assert t.pending == 1
    assert t.done(c) == [c]
    assert t.pending == 0


def test_identity_not_equality() -> None:
    t: CommitTracker[list[int]] = CommitTracker()
    first, second = [1], [1]
    t.add(first)
    t.add(second)
    assert t.done(second) == []
    out = t.done(first)
    assert out[0] is first and out[1] is second


def test_unknown_or_already_committed_item_raises() -> None:
    t: CommitTracker[object] = CommitTracker()
    x = object()
    with pytest.raises(ValueError):
        t.done(x)
    t.add(x)
    assert t.done(x) == [x]
    with pytest.raises(ValueError):
        t.done(x)


def test_adding_the_same_object_twice_raises() -> None:
    t: CommitTracker[object] = CommitTracker()
    x = object()
    t.add(x)
    with pytest.raises(ValueError):
        t.add(x)


def test_done_twice_before_commit_is_harmless() -> None:
    t: CommitTracker[object] = CommitTracker()
    a, b = object(), object()
    t.add(a)
    t.add(b)
    assert t.done(b) == []
    assert t.done(b) == []
    assert t.done(a) == [a, b]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_interleaving_commits_in_read_order(data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 30), label="n")
    items = [object() for _ in range(n)]
    t: CommitTracker[object] = CommitTracker()
    added = 0
    finished: set[int] = set()
    outstanding: list[object] = []
    returned: list[object] = []
    while added < n or outstanding:
        add_next = added < n and (not outstanding or data.draw(st.booleans(), label="add?"))
        if add_next:
            t.add(items[added])
            outstanding.append(items[added])
            added += 1
            continue
        item = outstanding.pop(data.draw(st.integers(0, len(outstanding) - 1), label="pick"))
        finished.add(id(item))
        out = t.done(item)
        for x in out:  # everything up to and including x has finished
            idx = next(i for i, y in enumerate(items) if y is x)
            assert all(id(y) in finished for y in items[: idx + 1])
        returned.extend(out)
        if len(returned) < added:  # greedy: the first uncommitted item is still unfinished
            assert id(items[len(returned)]) not in finished
        assert t.pending == added - len(returned)
    assert [id(x) for x in returned] == [id(x) for x in items]
