"""RecentKeys (the claims a prefetched idempotency lookup is completed from): the newest
`keep` distinct keys are always found, nothing never added is, and memory stays bounded."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pipeline.recent import RecentKeys

keys = st.integers(0, 60).map(lambda i: i.to_bytes(2, "big"))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 20), st.lists(st.lists(keys, max_size=15), max_size=40))
def test_the_newest_keep_keys_are_found_and_nothing_else(
    keep: int, batches: list[list[bytes]]
) -> None:
    recent = RecentKeys(keep)
    last_added: dict[bytes, int] = {}  # key -> when it was last added (a model of the rule)
    clock = 0
    for batch in batches:
        recent.add(batch)
        for key in batch:
            clock += 1
            last_added[key] = clock
        newest = sorted(last_added, key=last_added.__getitem__, reverse=True)[:keep]
        for key in newest:
            assert key in recent
            assert not recent.isdisjoint([key])
        universe = [i.to_bytes(2, "big") for i in range(61)]
        for key in universe:
            if key not in last_added:
                assert key not in recent
                assert recent.isdisjoint([key])
        found = [k for k in universe if k in recent]
        assert recent.isdisjoint([k for k in universe if k not in found])
        assert len(recent) < 2 * keep + max((len(b) for b in batches), default=0)


def test_keep_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RecentKeys(0)
