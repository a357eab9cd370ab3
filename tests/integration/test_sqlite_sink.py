"""The SQLite sink on a real file, beyond the sink contract (test_sink_contract.py): the
row layout, the guard inside SQL, revisions SQLite cannot hold, an unstarted sink, reopening."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.errors import SinkError
from ingest.records import ReasonCode, Record, SinkResult
from ingest.sinks.sqlite import PAGE_SIZE, SQLiteSink
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
    body = v3_body(
        tenant,
        entity_type,
        entity_id,
        revision,
        attributes=attributes,
        priority="normal",
        deleted=deleted,
    )
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


async def test_the_row_holds_the_winner_and_a_tombstone_keeps_its_row(sink: SQLiteSink) -> None:
    """Storage layout; the judgements themselves are the contract's (test_sink_contract.py)."""
    await sink.write([rec("a", 5), rec("a", 6), rec("b", 1)])
    row = await sink.fetch("t", "customer", "a")
    assert row is not None and row["revision"] == 6 and row["deleted"] is False
    assert row["attributes"] == {"name": "a@6"}
    assert row["relations"] == [{"type": "owns", "entity_type": "account", "entity_id": "a-1"}]
    assert await sink.count() == 2
    await sink.write([rec("a", 7, deleted=True)])
    row = await sink.fetch("t", "customer", "a")
    assert row is not None
    assert row["deleted"] is True and row["attributes"] is None and row["revision"] == 7
    assert await sink.count() == 2 and await sink.count(live_only=True) == 1


async def test_guard_holds_in_sql_even_against_a_stale_judgement(sink: SQLiteSink) -> None:
    """The upsert's WHERE clause refuses an older row even when written directly."""
    await sink.write([rec("a", 9)])
    await sink.db.run(lambda c: c.execute(_upsert_sql(), SQLiteSink.row_of(rec("a", 2))))
    row = await sink.fetch("t", "customer", "a")
    assert row is not None and row["revision"] == 9


def _upsert_sql() -> str:
    from ingest.sinks import sqlite as mod

    return mod._UPSERT


async def test_revision_too_large_for_sqlite_is_a_constraint_violation(sink: SQLiteSink) -> None:
    results = await sink.write([rec("a", 2**63), rec("b", 1)])
    assert statuses(results) == ["CONSTRAINT_VIOLATION", "applied"]


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


async def test_a_new_sink_file_has_16_kib_pages_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    """sink.db's pages (`PAGE_SIZE`): a file the sink makes has them; a file made before,
    with SQLite's 4 KiB, is written and read as it is."""
    new = SQLiteSink("sqlite", tmp_path / "sink.db")
    await new.start()
    assert await new.db.run(lambda c: c.execute("PRAGMA page_size").fetchone()[0]) == PAGE_SIZE
    await new.close()
    old = tmp_path / "old.db"
    sqlite3.connect(old).execute("CREATE TABLE t (a)").connection.close()
    sink = SQLiteSink("sqlite", old)
    await sink.start()
    assert await sink.db.run(lambda c: c.execute("PRAGMA page_size").fetchone()[0]) == 4096
    assert statuses(await sink.write([rec("a", 1), rec("b", 1)])) == ["applied", "applied"]
    assert await sink.count() == 2
    await sink.close()


async def test_a_file_of_the_old_layout_keeps_its_rows_and_guard(tmp_path: Path) -> None:
    """Migration 103 rebuilds a WITHOUT ROWID `entities` (the layout before it) as a rowid
    table keyed by a UNIQUE index: every row and column is kept, the view still reads it,
    and the stored revisions still judge and guard what comes next."""
    from ingest.sinks.sqlite import SINK_MIGRATIONS
    from ingest.state.sqlite import SQLiteDB

    path = tmp_path / "sink.db"
    old = await SQLiteDB.open(path, [m for m in SINK_MIGRATIONS if m.version < 103])
    rows = [SQLiteSink.row_of(rec(f"e{i}", 5, deleted=i == 3)) for i in range(6)]
    await old.run(lambda c: c.executemany(
        "INSERT INTO entities (tenant, entity_type, entity_id, revision, deleted, occurred_at,"
        " attributes, relations, dedupe_key, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows).connection.commit())  # fmt: skip
    await old.close()
    sink = SQLiteSink("sqlite", path)
    await sink.start()
    table = await sink.db.run(lambda c: c.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'entities'").fetchone()[0])  # fmt: skip
    assert "WITHOUT ROWID" not in table and "UNIQUE (tenant, entity_type, entity_id)" in table
    assert await sink.count() == 6 and await sink.count(live_only=True) == 5
    for row in rows:
        stored = await sink.fetch(*row[:3])
        assert stored is not None and stored["revision"] == 5 and stored["deleted"] == (row[4] == 1)
        assert stored["dedupe_key"] == row[8] and stored["updated_at"] == row[9]
    got = await sink.write([rec("e0", 5), rec("e1", 4), rec("e2", 6), rec("n", 1)])
    assert statuses(got) == ["unchanged", "OLDER_REVISION", "applied", "applied"]
    after = [await sink.fetch("t", "customer", e) for e in ("e1", "e2", "n")]
    assert [row and row["revision"] for row in after] == [5, 6, 1]
    await sink.close()


_texts = st.text(max_size=12)  # any code point, NUL and astral ones included
Batch = list[tuple[str, int, bool, str]]  # (entity_id, revision, deleted, attribute text)
_batches = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b\x00", "c", "d", "é😀"]) | _texts.filter(bool),
            st.integers(0, 3) | st.integers(-(2**63), 2**64 - 1),
            st.booleans(),
            _texts,
        ),
        min_size=1,
        max_size=9,
    ),
    min_size=1,
    max_size=4,
)


async def _written(
    path: Path, batches: list[Batch], *, insert_first: bool = True, rows_per_statement: int = 500
) -> tuple[list[list[str]], list[Any]]:
    """Each batch's results and then the whole table, written by a sink set as asked."""
    s = SQLiteSink("sqlite", path)
    await s.start()
    s.rows_per_statement = rows_per_statement
    if not insert_first:
        s.insert_skip = 10**9
    out = []
    for batch in batches:
        records = [rec(e, r, deleted=d, attrs={"name": a}) for e, r, d, a in batch]
        out.append(statuses(await s.write(records)))
    rows = await s.db.run(lambda c: c.execute(
        "SELECT tenant, entity_type, entity_id, revision, deleted, occurred_at,"
        " attributes, relations, dedupe_key, prev_revision FROM entities"
        " ORDER BY entity_id").fetchall())  # fmt: skip
    await s.close()
    return out, rows


@settings(max_examples=60, deadline=None)
@given(batches=_batches)
def test_a_plain_insert_first_ends_as_the_lookup_and_upsert_would(batches: list[Batch]) -> None:
    """Batches written INSERT-first (falling back to the lookup when an entity is stored or
    a row refused) leave the same results and the same table as lookup-first ones."""
    with tempfile.TemporaryDirectory() as tmp:
        first = asyncio.run(_written(Path(tmp) / "insert.db", batches))
        assert first == asyncio.run(_written(Path(tmp) / "lookup.db", batches, insert_first=False))


async def test_a_feed_of_updates_goes_in_by_the_upsert_alone(sink: SQLiteSink) -> None:
    """Newer revisions of stored entities are applied by the upsert without the lookup (its
    SELECTs would show in the trace); the table ends as the lookup path leaves it."""
    await sink.write([rec(f"e{i}", 1) for i in range(3)])
    ran: list[str] = []
    await sink.db.run(lambda c: c.set_trace_callback(ran.append))
    for revision in range(2, 8):
        assert (
            statuses(await sink.write([rec(f"e{i}", revision) for i in range(3)]))
            == ["applied"] * 3
        )
    await sink.db.run(lambda c: c.set_trace_callback(None))
    assert sink.paths == {"insert": 7, "fallback": 0, "upsert": 0}
    # each batch one statement, its own transaction (no BEGIN, COMMIT: `_insert_alone`)
    assert [sql.split()[0] for sql in ran] == ["INSERT"] * 6
    row = await sink.fetch("t", "customer", "e2")
    assert row is not None and row["revision"] == 7
    stored = await sink.db.run(
        lambda c: c.execute("SELECT prev_revision FROM entities WHERE entity_id = 'e2'").fetchone()
    )
    assert stored == (6,)


async def test_a_feed_of_replays_backs_off_from_the_upsert(sink: SQLiteSink) -> None:
    """A batch the upsert would leave a row of alone (a stored revision equal or higher) is
    undone and judged by the lookup; the next ones go to the lookup at once."""
    await sink.write([rec(f"e{i}", 1) for i in range(3)])
    assert sink.paths == {"insert": 1, "fallback": 0, "upsert": 0}
    for _ in range(6):  # an undone upsert, then 4 batches straight to the lookup
        again = statuses(await sink.write([rec("e0", 2), rec("e1", 1), rec("e2", 0)]))
        assert again[1:] == ["unchanged", "OLDER_REVISION"]
    assert sink.paths == {"insert": 1, "fallback": 2, "upsert": 4}
    assert sink.insert_skip == 8  # the second miss doubled the backoff
    row = await sink.fetch("t", "customer", "e0")
    assert row is not None and row["revision"] == 2
    sink.insert_skip = 0
    await sink.write([rec("new", 1), rec("e0", 3)])  # all applied: the upsert, reset
    assert sink.paths["insert"] == 2
    await sink.write([rec("e0", 3)])
    assert sink.insert_skip == 4


async def test_a_batch_is_written_by_a_few_multi_row_statements(sink: SQLiteSink) -> None:
    """Rows go in by INSERTs of up to `rows_per_statement` rows, not one statement per row
    (executemany takes the GIL back for every row, beside a busy event loop)."""
    ran: list[str] = []
    await sink.db.run(lambda c: c.set_trace_callback(ran.append))
    await sink.write([rec(f"e{i}", 1) for i in range(2000)])  # all new: the upsert alone
    # a batch that fits a statement: that statement alone, its own transaction (it undoes
    # itself when it fails), one GIL hand-back under the writer lock
    assert [sql.split()[0] for sql in ran] == ["INSERT"]
    ran.clear()
    sink.rows_per_statement = 500
    await sink.write([rec(f"n{i}", 1) for i in range(2000)])  # four statements: a savepoint
    assert [sql.split()[0] for sql in ran] == ["BEGIN", "SAVEPOINT"] + ["INSERT"] * 4 + [
        "RELEASE",
        "COMMIT",
    ]
    ran.clear()
    sink.insert_skip = 1  # updates, by the lookup and the upsert
    assert statuses(await sink.write([rec(f"e{i}", 2) for i in range(1200)])) == ["applied"] * 1200
    assert len([sql for sql in ran if sql.startswith("INSERT")]) == 3
    await sink.db.run(lambda c: c.set_trace_callback(None))
    assert await sink.count() == 4000
    row = await sink.fetch("t", "customer", "e1199")
    assert row is not None and row["revision"] == 2


@settings(max_examples=60, deadline=None)
@given(batches=_batches, per=st.integers(2, 4), insert_first=st.booleans())
def test_multi_row_statements_end_as_one_row_at_a_time(
    batches: list[Batch], per: int, insert_first: bool
) -> None:
    """Rows written `per` to a statement (crossing statement bounds, refused rows among them)
    leave the same results and the same table as one statement per row."""
    with tempfile.TemporaryDirectory() as tmp:
        many = asyncio.run(
            _written(Path(tmp) / "m.db", batches, insert_first=insert_first, rows_per_statement=per)
        )
        one = asyncio.run(
            _written(Path(tmp) / "1.db", batches, insert_first=insert_first, rows_per_statement=1)
        )
        assert many == one


async def test_rows_from_the_compiled_decoder_store_what_row_of_stores(tmp_path: Path) -> None:
    """Records carrying the compiled decoder's row (`Record.sqlite_row`) and the same records
    from the Python decoder (the sink builds `row_of`) give the same results and the same
    table, through new rows, updates, tombstones, stale and repeated revisions."""
    from ingest.pipeline.decode import Decoder
    from tests.unit.test_decode import NOW, good, raw

    compiled = Decoder(now=lambda: NOW, sqlite_rows=True)
    if compiled.path != "compiled":
        pytest.skip("the compiled extension is not built")
    python = Decoder(now=lambda: NOW, native=False)
    rel = [{"type": "OWNS", "target_type": "account", "target_id": "a-1"}]
    feeds = [
        [good(entity_id=f"o-{i}", revision=1, relations=rel if i % 2 else None) for i in range(5)],
        [good(entity_id="o-0", revision=2), good(entity_id="o-1", revision=3, deleted=True),
         good(entity_id="o-2", revision=1), good(entity_id="o-3", revision=0)],
        [good(entity_id="o-1", revision=2), good(entity_id="o-4", revision=5, attributes={
            "name": "é😀", "amount": 2.0})],
    ]  # fmt: skip
    tables = []
    for decoder, name in ((compiled, "c.db"), (python, "p.db")):
        s = SQLiteSink("sqlite", tmp_path / name)
        await s.start()
        out = []
        for feed in feeds:
            records = decoder.decode_many([raw(body) for body in feed])
            assert all(isinstance(r, Record) for r in records)
            assert all((r.sqlite_row is not None) == (decoder is compiled) for r in records)  # type: ignore[union-attr]
            out.append(statuses(await s.write(records)))  # type: ignore[arg-type]
        rows = await s.db.run(lambda c: c.execute(
            "SELECT tenant, entity_type, entity_id, revision, deleted, occurred_at,"
            " attributes, relations, dedupe_key, prev_revision FROM entities"
            " ORDER BY entity_id").fetchall())  # fmt: skip
        tables.append((out, rows))
        await s.close()
    assert tables[0] == tables[1]
    assert tables[0][0][1] == ["applied", "applied", "unchanged", "OLDER_REVISION"]


_WRITER = """
import asyncio, sys
from ingest.sinks.sqlite import SQLiteSink
from tests.integration.test_sqlite_sink import rec

async def main(path, first):
    sink = SQLiteSink("sqlite", path)
    await sink.start()
    b = first
    while True:
        # 300 stored entities at revision b + 1 and 100 new ones: one statement, alone
        stored = [rec(f"e{j}", b + 1) for j in range(300)]
        await sink.write(stored + [rec(f"n{b}-{k}", 1) for k in range(100)])
        print(b, flush=True)
        b += 1

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_a_batch_is_all_or_nothing_when_killed_at_any_instant(tmp_path: Path) -> None:
    """A process writing batches of updates and new rows without pause (each batch one
    statement in its own transaction, `_insert_alone`) is killed with SIGKILL at random
    moments and started again on the same file: every batch whose write returned is there,
    and the one in flight is there wholly or not at all (every stored entity at one
    revision, each batch's new rows all or none)."""
    import random
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    path = tmp_path / "sink.db"
    rng = random.Random(7)
    written = -1
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(written + 1)],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline()  # its first write returned: then kill it at random
        assert line, f"writer ended: {proc.wait()}"
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        written = int(line)
        for line in proc.stdout:  # writes reported before the kill landed
            written = int(line)
        proc.wait()
        with sqlite3.connect(path) as c:
            revisions = c.execute(
                "SELECT DISTINCT revision FROM entities WHERE entity_id GLOB 'e*'"
            ).fetchall()
            new = dict(c.execute(
                "SELECT substr(entity_id, 2, instr(entity_id, '-') - 2), count(*)"
                " FROM entities WHERE entity_id GLOB 'n*' GROUP BY 1"
            ).fetchall())  # fmt: skip
        assert len(revisions) == 1, revisions  # no batch half-applied
        (revision,) = revisions[0]
        assert revision - 1 in (written, written + 1)  # the batch in flight: all or none
        assert set(new.values()) == {100}
        assert {int(b) for b in new} == set(range(revision))
        written = revision - 1  # the next process writes after what is stored
    assert written > 20
