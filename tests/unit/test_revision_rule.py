"""The shared revision rule, and that a replayed batch is judged as its first pass was."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.records import RawRecord, ReasonCode, Record, SinkStatus, dedupe_key
from ingest.sinks.base import EntityKey, StoredRow, judge_batch, latest_per_entity


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


@settings(max_examples=300)
@given(batches, prior)
def test_replay_is_judged_like_the_first_pass(spec: list[tuple[str, int, int]],
                                              before: dict[str, int]) -> None:
    records = [rec(e, r, s) for e, r, s in spec]
    stored: dict[EntityKey, StoredRow] = {
        ("t", "e", e): (r, b"older-record-key".ljust(32, b"."), None) for e, r in before.items()}
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
