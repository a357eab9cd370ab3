"""The audit trail on SQLite: appended rows, read back newest first with filters."""

from __future__ import annotations

from pathlib import Path

from ingest.state.audit import DENIED, OK, AuditEntry, AuditFilter, SQLiteAuditStore
from ingest.state.sqlite import SQLiteDB


async def test_record_and_query(tmp_path: Path) -> None:
    db = await SQLiteDB.open(tmp_path / "state.db")
    try:
        store = SQLiteAuditStore(db)
        rows = [
            AuditEntry(100.0, "alice", "token", "admin.drain", OK, "127.0.0.1:5000"),
            AuditEntry(101.0, "bob", "token", "admin.pause", DENIED, "10.0.0.2:1"),
            AuditEntry(
                102.0,
                "carol",
                "cli",
                "replay.plan",
                OK,
                "cli@host",
                "acme-corp",
                "rp-0000abcd",
                {"window": ["a", "b"]},
            ),
            AuditEntry(
                103.0,
                "dave",
                "cli",
                "replay.approve",
                OK,
                "cli@host",
                "acme-corp",
                "rp-0000abcd",
                {"rfa": "RFA-1"},
            ),
        ]
        for row in rows:
            await store.record(row)
        got = await store.query(AuditFilter())
        assert [r.actor for r in got] == ["dave", "carol", "bob", "alice"]
        assert got[0].detail == {"rfa": "RFA-1"} and got[0].id is not None
        assert got[1].target == "rp-0000abcd" and got[1].tenant == "acme-corp"
        assert [r.action for r in await store.query(AuditFilter(action="admin."))] == [
            "admin.pause",
            "admin.drain",
        ]
        assert [r.actor for r in await store.query(AuditFilter(actor="bob"))] == ["bob"]
        assert [r.actor for r in await store.query(AuditFilter(tenant="acme-corp", limit=1))] == [
            "dave"
        ]
        assert [r.actor for r in await store.query(AuditFilter(since=102.0))] == ["dave", "carol"]
        assert await store.query(AuditFilter(action="admin.drainx")) == []
    finally:
        await db.close()
