"""The DLQ write is never the poison: any entry can be stored, its payload byte for byte.

Real SQLite; the Postgres twin is tests/integration/test_dlq_fit_postgres.py.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.records import DLQEntry, ReasonCode
from ingest.state.base import DLQFilter
from ingest.state.dlq_fit import add_fitted, fit
from ingest.state.sqlite import SQLiteDB, SQLiteDLQStore
from tests._hostile import assert_stored, hostile_entries


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_entries(), min_size=1, max_size=6, unique_by=lambda e: e.dedupe_key))
def test_any_entry_is_stored_with_its_payload(entries: list[DLQEntry]) -> None:
    async def go() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            db = await SQLiteDB.open(Path(tmp) / "state.db")
            try:
                store = SQLiteDLQStore(db)
                await add_fitted(store, entries)
                assert_stored(entries, [e async for page in store.scan(DLQFilter()) for e in page])
            finally:
                await db.close()

    asyncio.run(go())


AT = datetime(2026, 1, 1, tzinfo=UTC)


def test_an_out_of_range_revision_is_kept_as_text_in_detail() -> None:
    e = fit(DLQEntry(b"k" * 32, "t", "s", None, ReasonCode.VALIDATION_FAIL, {"message": "m"},
                     b"{}", 1, AT, AT, revision=2**63))
    assert e.revision is None and e.detail["revision"] == str(2**63)


class Refusing(SQLiteDLQStore):
    """Refuses (like a driver would) any batch holding the entry with payload b'bad'."""

    async def add(self, entries: Sequence[DLQEntry]) -> None:
        if any(e.payload == b"bad" and "dlq_write_error" not in e.detail for e in entries):
            raise ValueError("value out of range for the column")
        await super().add(entries)


async def test_an_entry_the_store_refuses_is_isolated_and_kept_minimal(tmp_path: Path) -> None:
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:
        store = Refusing(db)
        entries = [DLQEntry(bytes([i]) * 32, "t", "s", None, ReasonCode.VALIDATION_FAIL,
                            {"message": f"m{i}"}, b"bad" if i == 3 else b"ok%d" % i, 1, AT, AT,
                            entity_id=f"e{i}") for i in range(8)]
        await add_fitted(store, entries)
        stored = {e.payload: e for page in [p async for p in store.scan(DLQFilter())] for e in page}
        assert len(stored) == 8
        assert stored[b"bad"].detail["dlq_write_error"].startswith("ValueError")
        assert stored[b"ok2"].entity_id == "e2"  # the others as they were
    finally:
        await db.close()
