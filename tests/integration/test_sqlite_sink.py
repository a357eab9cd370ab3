"""The SQLite sink on a real file: the revision rule, tombstones, constraint and lock errors."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ingest.errors import SinkError
from ingest.records import ReasonCode, Record, SinkResult, SinkStatus
from ingest.sinks.sqlite import SQLiteSink
from tests.conftest import v3_body
from tests.integration.conftest import record_of

pytestmark = pytest.mark.integration


def rec(
    entity_id: str,
    revision: int,
    *,
    deleted: bool = False,
    tenant: str = "t",
    entity_type: str = "customer",
    attrs: dict[str, Any] | None = None,
) -> Record:
    attributes = attrs if attrs is not None else {"name": f"{entity_id}@{revision}"}
    body = v3_body(tenant, entity_type, entity_id, revision, attributes=attributes,
                   priority="normal", deleted=deleted)
    body["relations"] = [{"type": "owns", "entity_type": "account", "entity_id": "a-1"}]
    return record_of(body, seq=revision)


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[SQLiteSink]:
    s = SQLiteSink("sqlite", tmp_path / "data" / "sink.db")
    await s.start()
    yield s
    await s.close()


def statuses(results: list[SinkResult]) -> list[str]:
    return [r.reason.value if r.reason else r.status.value for r in results]


async def test_newer_applies_equal_unchanged_older_fails(sink: SQLiteSink) -> None:
    assert statuses(await sink.write([rec("a", 5)])) == ["applied"]
    results = await sink.write([rec("a", 6), rec("b", 1)])
    assert statuses(results) == ["applied", "applied"]
    assert statuses(await sink.write([rec("a", 6)])) == ["unchanged"]
    [older] = await sink.write([rec("a", 3)])
    assert older.status is SinkStatus.FAILED and older.reason is ReasonCode.OLDER_REVISION
    assert older.detail is not None
    assert older.detail["stored_revision"] == 6 and older.detail["incoming_revision"] == 3
    row = await sink.fetch("t", "customer", "a")
    assert row is not None
    assert row["revision"] == 6 and row["attributes"] == {"name": "a@6"}
    assert row["relations"] == [{"type": "owns", "entity_type": "account", "entity_id": "a-1"}]
    assert await sink.count() == 2


async def test_in_batch_order_is_judged_in_arrival_order(sink: SQLiteSink) -> None:
    await sink.write([rec("a", 2)])
    batch = [rec("a", 3), rec("a", 1), rec("a", 5), rec("a", 5), rec("a", 4), rec("b", 1)]
    assert statuses(await sink.write(batch)) == [
        "applied",
        "OLDER_REVISION",
        "applied",
        "unchanged",
        "OLDER_REVISION",
        "applied",
    ]
    row = await sink.fetch("t", "customer", "a")
    assert row is not None and row["revision"] == 5 and row["attributes"] == {"name": "a@5"}


async def test_tombstone_is_kept_and_blocks_resurrection(sink: SQLiteSink) -> None:
    await sink.write([rec("a", 1), rec("b", 1)])
    assert statuses(await sink.write([rec("a", 5, deleted=True)])) == ["applied"]
    row = await sink.fetch("t", "customer", "a")
    assert row is not None
    assert row["deleted"] is True and row["attributes"] is None and row["revision"] == 5
    assert await sink.count(live_only=True) == 1
    # a late, older update must not bring the entity back
    [late] = await sink.write([rec("a", 4)])
    assert late.reason is ReasonCode.OLDER_REVISION
    row = await sink.fetch("t", "customer", "a")
    assert row is not None and row["deleted"] is True
    # a genuinely newer revision does
    assert statuses(await sink.write([rec("a", 6)])) == ["applied"]
    assert await sink.count(live_only=True) == 2


async def test_guard_holds_in_sql_even_against_a_stale_judgement(sink: SQLiteSink) -> None:
    """The upsert's WHERE clause refuses an older row even when written directly."""
    await sink.write([rec("a", 9)])
    await sink.db.run(lambda c: c.execute(_upsert_sql(), SQLiteSink.row_of(rec("a", 2))))
    row = await sink.fetch("t", "customer", "a")
    assert row is not None and row["revision"] == 9


def _upsert_sql() -> str:
    from ingest.sinks import sqlite as mod

    return mod._UPSERT


async def test_constraint_violation_fails_only_that_row(sink: SQLiteSink) -> None:
    await sink.db.run(
        lambda c: c.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON entities"
            " WHEN NEW.attributes LIKE '%poison%' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
        )
    )
    batch = [
        rec("a", 1),
        rec("b", 1, attrs={"x": "poison"}),
        rec("c", 1),
        rec("c", 2, attrs={"x": "poison"}),
    ]
    results = await sink.write(batch)
    assert statuses(results) == [
        "applied",
        "CONSTRAINT_VIOLATION",
        "applied",
        "CONSTRAINT_VIOLATION",
    ]
    assert results[1].detail is not None and "poisoned" in results[1].detail["message"]
    assert await sink.fetch("t", "customer", "b") is None
    row = await sink.fetch("t", "customer", "c")
    assert row is not None and row["revision"] == 1  # retried without the bad newer row
    assert await sink.count() == 2


async def test_revision_too_large_for_sqlite_is_a_constraint_violation(sink: SQLiteSink) -> None:
    results = await sink.write([rec("a", 2**63), rec("b", 1)])
    assert statuses(results) == ["CONSTRAINT_VIOLATION", "applied"]


async def test_locked_database_is_a_sink_timeout(sink: SQLiteSink) -> None:
    await sink.db.run(lambda c: c.execute("PRAGMA busy_timeout = 50"))
    other = sqlite3.connect(sink.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(SinkError) as err:
            await sink.write([rec("a", 1)])
        assert err.value.reason is ReasonCode.SINK_TIMEOUT
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert statuses(await sink.write([rec("a", 1)])) == ["applied"]  # recovers by itself


async def test_unstarted_sink_is_a_connection_error(tmp_path: Path) -> None:
    s = SQLiteSink("sqlite", tmp_path / "sink.db")
    assert (await s.health())["connected"] is False
    with pytest.raises(SinkError) as err:
        await s.write([rec("a", 1)])
    assert err.value.reason is ReasonCode.CONNECTION_ERROR


async def test_bulk_insert_raw_stores_the_same_rows_as_write(tmp_path: Path) -> None:
    written, raw = SQLiteSink("w", tmp_path / "w.db"), SQLiteSink("r", tmp_path / "r.db")
    await written.start()
    await raw.start()
    records = [rec(f"e{i}", i + 1, deleted=i % 7 == 0) for i in range(3000)]
    await written.write(records)
    await raw.bulk_insert_raw([SQLiteSink.row_of(r) for r in records])
    assert await written.count() == await raw.count() == 3000
    for i in (0, 1, 2999):
        a = await written.fetch("t", "customer", f"e{i}")
        b = await raw.fetch("t", "customer", f"e{i}")
        assert a is not None and b is not None
        a.pop("updated_at"), b.pop("updated_at")
        assert a == b
    assert (await written.health()) == {
        "connected": True,
        "target": str(written.path),
        "kind": "sqlite",
    }
    await written.close()
    await raw.close()


async def test_rows_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sink.db"
    first = SQLiteSink("sqlite", path)
    await first.start()
    await first.write([rec("a", 3)])
    await first.close()
    second = SQLiteSink("sqlite", path)
    await second.start()
    assert statuses(await second.write([rec("a", 3), rec("a", 2)])) == [
        "unchanged",
        "OLDER_REVISION",
    ]
    await second.close()
