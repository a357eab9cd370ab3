"""Hypothesis strategies for hostile values: what a sender, a file or a bug can hand us.

Shared by the DLQ-fit tests (SQLite in unit, Postgres in integration) and the fuzz test that
drives the running service (tests/e2e/test_fuzz_service.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from ingest.records import DLQEntry, ReasonCode

# Numbers at and around every boundary that matters: 53-bit floats, 63/64-bit integers, far out
BIG_INTS = st.sampled_from(
    [2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 10**30, -(10**40)]
) | st.integers()
ODD_TEXT = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()), max_size=40
) | st.sampled_from(["\x00", "a\x00b", "\ud800", "\udfff", "\u202e", "\ufeff", "é" * 3, "𝕏"])


def nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


JSON_LEAF = st.none() | st.booleans() | BIG_INTS | st.floats() | ODD_TEXT
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
    max_leaves=12,
) | st.sampled_from([nested(40), nested(300), nested(1000)])


@st.composite
def hostile_entries(draw: st.DrawFn) -> DLQEntry:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return DLQEntry(
        dedupe_key=draw(st.binary(min_size=32, max_size=32)),
        tenant=draw(st.sampled_from(["acme", "t\x00x", "\ud800"])),
        source=draw(st.sampled_from(["webhook", "inbox"])),
        sink=draw(st.none() | st.just("sqlite")),
        reason=draw(st.sampled_from(list(ReasonCode))),
        detail=draw(st.dictionaries(ODD_TEXT, JSON_VALUE, max_size=4)),
        payload=draw(st.binary(max_size=200)),
        attempts=1,
        first_failed_at=at,
        last_failed_at=at,
        entity_type=draw(st.none() | ODD_TEXT),
        entity_id=draw(st.none() | ODD_TEXT),
        revision=draw(st.none() | BIG_INTS),
    )


def assert_stored(entries: list[DLQEntry], stored: list[DLQEntry]) -> None:
    """Every entry is in the store once, its payload and reason exact, its revision too
    when a 64-bit column can hold it."""
    by_key = {e.dedupe_key: e for e in stored}
    assert len(stored) == len(entries) == len(by_key)
    for e in entries:
        got = by_key[e.dedupe_key]
        assert got.payload == e.payload and got.reason is e.reason
        if e.revision is not None and -(2**63) <= e.revision < 2**63:
            assert got.revision == e.revision
