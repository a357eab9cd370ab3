"""Commits asked for while a read is in progress are made together (`_serve_commits`, one
broker round trip): one `_commit_locked(*positions)` must leave the source's books as the
same positions committed one by one, in the order asked, would. Without a broker: with no
consumer, the books are all a commit changes."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import KafkaSourceConfig
from ingest.sources.base import SourceBatch
from ingest.sources.kafka import KafkaPosition, KafkaSource, _Partition

KEYS = [("t", 0), ("t", 1), ("u", 0)]
IN_FLIGHT = range(0, 60, 5)  # first offsets of the batches read


def fresh(epochs: dict[tuple[str, int], int]) -> KafkaSource:
    src = KafkaSource(KafkaSourceConfig(topics=["t", "u"]), clock=lambda: 7.0)
    for key, epoch in epochs.items():
        src._parts[key] = _Partition(epoch, inflight=deque((o, 0.0) for o in IN_FLIGHT))
    return src


def books(src: KafkaSource) -> tuple[Any, ...]:
    parts = {k: (p.durable, p.durable_since, list(p.inflight)) for k, p in src._parts.items()}
    return parts, src.skipped_commits


positions = st.lists(
    st.dictionaries(st.sampled_from(KEYS), st.tuples(st.integers(1, 2), st.integers(0, 60))),
    max_size=6,
)
epochs = st.fixed_dictionaries({k: st.integers(1, 2) for k in KEYS})


@settings(max_examples=300, deadline=None)
@given(asked=positions, epochs=epochs)
def test_commits_made_together_keep_the_books_of_commits_made_one_by_one(
    asked: list[KafkaPosition], epochs: dict[tuple[str, int], int]
) -> None:
    one_by_one, together = fresh(epochs), fresh(epochs)
    for position in asked:
        one_by_one._commit_locked(position)
    together._commit_locked(*asked)
    assert books(together) == books(one_by_one)


@settings(max_examples=50, deadline=None)
@given(asked=positions.filter(lambda ps: all(ps)), epochs=epochs)
def test_every_commit_asked_for_at_once_returns_after_its_position_is_noted(
    asked: list[KafkaPosition], epochs: dict[tuple[str, int], int]
) -> None:
    """commit() calls made together (the runner's committer and a close, say) each return,
    and only once the books hold every position asked for before it."""
    reference, src = fresh(epochs), fresh(epochs)
    for position in asked:
        reference._commit_locked(position)

    async def ask() -> None:
        batches = [SourceBatch([], p, 0, 0) for p in asked]
        await asyncio.wait_for(asyncio.gather(*(src.commit(b) for b in batches)), 10)

    asyncio.run(ask())
    src._poll_pool.shutdown(wait=True)
    assert books(src) == books(reference)
