"""The shared revision rule, that a replayed batch is judged as its first pass was, and that a
row the store refuses fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.records import RawRecord, ReasonCode, Record, SinkResult, SinkStatus, dedupe_key
from ingest.sinks.base import (
    EntityKey,
    StoredRow,
    judge_batch,
    latest_per_entity,
    write_around_refused,
)


def rec(entity: str, revision: int, salt: int = 0) -> Record:
    body: dict[str, Any] = {"schema_version": 3, "tenant_id": "t", "entity_type": "e",
                            "entity_id": entity, "revision": revision,
                            "occurred_at": "2025-01-01T00:00:00Z", "attributes": {"s": salt}}
    raw = RawRecord(data=b"", tenant="t", source="s", seq=0, position=None, event_time=0.0)
    return Record.of(raw, body, dedupe_key(body))


def apply(records: list[Record], stored: dict[EntityKey, StoredRow]) -> dict[EntityKey, StoredRow]:
    """What a sink stores after writing a batch: each entity's winner if newer."""
    after = dict(stored)
    for w in latest_per_entity(records):
        old = stored.get(w.entity_key)
        if old is None or w.revision > old[0]:
            after[w.entity_key] = (w.revision, w.dedupe_key, None if old is None else old[0])
    return after


batches = st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 6), st.integers(0, 1)),
                   min_size=1, max_size=12)
prior = st.dictionaries(st.sampled_from("abc"), st.integers(0, 6), max_size=3)


def given_batch(spec: list[tuple[str, int, int]], before: dict[str, int]
                ) -> tuple[list[Record], dict[EntityKey, StoredRow]]:
    """A generated batch (entity, revision, salt) and the revisions stored before it."""
    records = [rec(e, r, s) for e, r, s in spec]
    stored: dict[EntityKey, StoredRow] = {
        ("t", "e", e): (r, b"older-record-key".ljust(32, b"."), None) for e, r in before.items()}
    return records, stored


@settings(max_examples=300)
@given(batches, prior)
def test_replay_is_judged_like_the_first_pass(spec: list[tuple[str, int, int]],
                                              before: dict[str, int]) -> None:
    records, stored = given_batch(spec, before)
    first = judge_batch(records, stored)
    replay = judge_batch(records, apply(records, stored))
    # What reaches the DLQ is identical; a record applied the first time is applied or
    # unchanged (already stored) the second time, never OLDER_REVISION.
    assert [r.reason for r in replay] == [r.reason for r in first]
    for a, b in zip(first, replay, strict=True):
        if a.status is SinkStatus.APPLIED:
            assert b.status in (SinkStatus.APPLIED, SinkStatus.UNCHANGED)


def test_in_batch_order_and_stored_revision() -> None:
    records = [rec("a", 3), rec("a", 5), rec("a", 2), rec("a", 5)]
    results = judge_batch(records, {("t", "e", "a"): (4, b"k" * 32, 1)})
    assert [r.status for r in results] == [SinkStatus.FAILED, SinkStatus.APPLIED,
                                           SinkStatus.FAILED, SinkStatus.UNCHANGED]
    assert results[0].reason is ReasonCode.OLDER_REVISION
    assert results[0].detail == {"message": "revision 3 is older than stored revision 4",
                                 "incoming_revision": 3, "stored_revision": 4}


def test_an_exact_repeat_of_the_stored_record_alone_is_unchanged() -> None:
    r = rec("a", 2)
    assert judge_batch([r], {("t", "e", "a"): (2, r.dedupe_key, 1)})[0].status is \
        SinkStatus.UNCHANGED


class RefusingStore:
    """A sink's one pass over a dict: it refuses to store a winner whose salt is 1."""

    def __init__(self, stored: dict[EntityKey, StoredRow]) -> None:
        self.stored = dict(stored)
        self.passes = 0

    async def write(self, batch: Sequence[Record]) -> tuple[list[SinkResult],
                                                             dict[EntityKey, SinkResult]]:
        self.passes += 1
        refused = {}
        for w in latest_per_entity(batch):
            old = self.stored.get(w.entity_key)
            if w.body["attributes"]["s"] == 1 and (old is None or w.revision > old[0]):
                refused[w.entity_key] = SinkResult.failed(ReasonCode.CONSTRAINT_VIOLATION,
                                                          message="refused")
        judged = judge_batch(batch, self.stored)
        self.stored = apply([r for r in batch if r.entity_key not in refused], self.stored)
        return judged, refused


@settings(max_examples=300)
@given(batches, prior)
def test_a_refused_row_fails_alone(spec: list[tuple[str, int, int]],
                                   before: dict[str, int]) -> None:
    """The outcome is the batch's as if the refused rows had never been in it."""
    records, stored = given_batch(spec, before)
    store = RefusingStore(stored)
    results = asyncio.run(write_around_refused(records, store.write))
    refused = {i for i, r in enumerate(results) if r.reason is ReasonCode.CONSTRAINT_VIOLATION}
    assert all(records[i].body["attributes"]["s"] == 1 for i in refused)
    rest = [r for i, r in enumerate(records) if i not in refused]
    assert [r for i, r in enumerate(results) if i not in refused] == judge_batch(rest, stored)
    assert store.stored == apply(rest, stored)
    assert store.passes <= 1 + len(refused)


def test_a_refused_winner_lets_the_next_best_record_of_its_entity_win() -> None:
    records = [rec("a", 1), rec("a", 3, salt=1), rec("a", 2), rec("b", 1, salt=1)]
    store = RefusingStore({})
    results = asyncio.run(write_around_refused(records, store.write))
    assert [r.reason or r.status for r in results] == [
        SinkStatus.APPLIED, ReasonCode.CONSTRAINT_VIOLATION, SinkStatus.APPLIED,
        ReasonCode.CONSTRAINT_VIOLATION]
    assert store.stored[("t", "e", "a")][0] == 2 and ("t", "e", "b") not in store.stored
