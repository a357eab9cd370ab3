"""ClaimLog (the claims a prefetched idempotency lookup is completed from): `since(mark)` is
exactly the keys of the batches added from the mark on, or None once they are not all held;
`may_meet` (compiled) never says two lists of keys are disjoint when they share one; and a
batch delivered with a lookup answered before another batch claimed its keys finds them
duplicates, whether the log still holds that claim or the lookup has to be sent again."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pipeline import recent
from ingest.pipeline.recent import ClaimLog, may_meet, union
from ingest.state.sqlite import SQLiteDB
from tests.unit.test_worker import FakeSleep, MemorySink, batch, make_pipeline

keys = st.integers(0, 60).map(lambda i: i.to_bytes(2, "big"))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 20), st.lists(st.lists(keys, max_size=15), max_size=40))
def test_since_a_mark_is_exactly_the_batches_added_after_it(
    keep: int, batches: list[list[bytes]]
) -> None:
    log = ClaimLog(keep)
    added: list[list[bytes]] = []  # every batch with keys, in order (a model of the log)
    marks: list[tuple[int, int]] = []  # (mark, how many batches were added before it)
    for batch_keys in batches:
        marks.append((log.mark(), len(added)))
        log.add(batch_keys)
        if batch_keys:
            added.append(batch_keys)
        for mark, before in marks:
            after = added[before:]
            got = log.since(mark)
            wanted = {k for b in after for k in b}
            if got is None:  # a batch after the mark was dropped: only for `keep` newer keys
                assert sum(len(b) for b in after[1:]) >= keep
                assert log.batches(mark) is None
            else:
                assert got == wanted
                assert log.batches(mark) == after
                assert union(after) == wanted
        assert len(log) < keep + max((len(b) for b in batches), default=0)


# Keys that often share their first 8 bytes (and differ after them, or only in length), are
# shorter than 8 bytes, or are digests: the compiled check reads the first 8 bytes alone.
_heads = st.sampled_from([b"", b"\x00", b"abcdefgh", b"abcdefgi", b"\x00" * 8, b"\xff" * 7])
key_bytes = st.one_of(
    st.builds(lambda head, tail: head + tail, _heads, st.binary(max_size=3)),
    st.binary(min_size=32, max_size=32),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(key_bytes, max_size=30), st.lists(key_bytes, max_size=30), st.data())
def test_may_meet_is_never_false_for_lists_that_share_a_key(
    claimed: list[bytes], keys: list[bytes], data: st.DataObject
) -> None:
    if claimed and data.draw(st.booleans()):  # often one key in both (an equal copy)
        keys.insert(data.draw(st.integers(0, len(keys))), bytes(bytearray(claimed[0])))
    assert recent._MAY_MEET is not None  # the compiled check is what runs here
    shared = not set(claimed).isdisjoint(keys)
    got = may_meet(claimed, keys)
    assert got or not shared
    heads = {k[:8].ljust(8, b"\0") for k in claimed}
    if not any(k[:8].ljust(8, b"\0") in heads for k in keys):
        assert got is False  # no two share their first 8 bytes: a sure answer
    assert may_meet(tuple(claimed), keys) == shared  # not lists: the Python twin, exact
    assert may_meet(claimed, [*keys, "not bytes"]) is True  # not all bytes: "check exactly"


def test_keep_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ClaimLog(0)


@pytest.mark.parametrize("keep", [100_000, 1])
async def test_a_lookup_answered_before_a_claim_still_finds_it(
    tmp_path: Path, keep: int
) -> None:
    """Batch B is looked up (prefetched) and answered before batch A, which shares two of its
    records, is delivered and claims them: B's shared records are duplicates. With `keep` 1
    the log holds only the latest batch, so B's lookup must be sent again."""
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:
        sink = MemorySink("a")
        pipe = make_pipeline(db, {"a": sink}, FakeSleep())
        pipe._claims = ClaimLog(keep)
        raws_a, decoded_a = batch(("e1", 1), ("e2", 1))
        raws_b, decoded_b = batch(("e1", 1), ("e2", 1), ("e3", 1))
        raws_c, decoded_c = batch(("e9", 1))
        lookup = pipe.prefetch_seen(decoded_b, raws_b)
        assert await lookup == set()  # answered before A's claim
        first = await pipe.deliver(raws_a, decoded_a)
        assert first.delivered == 2
        await pipe.deliver(raws_c, decoded_c)  # a later claim: the log may drop A's
        report = await pipe.deliver(raws_b, decoded_b, claimed_before=lookup)
        assert (report.delivered, report.duplicate) == (1, 2)
        # found by the claims, not by the sink's "unchanged": only e3 went to the sink
        assert [rec.entity_id for rec in report.sink_results["a"][0]] == ["e3"]
    finally:
        await db.close()
