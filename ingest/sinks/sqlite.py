"""The embedded sink: entities in one SQLite table, written with a revision-guarded upsert.

One row per (tenant, entity_type, entity_id) holding the highest revision seen, in a rowid
table with that key as a UNIQUE index (migration 103 says why). A tombstone
(`deleted: true`) does not remove the row: it keeps it with deleted=1, attributes NULL and the
tombstone's revision, so a late older revision of the entity loses the revision comparison
and cannot resurrect it. Readers use the `live_entities` view.

Each batch is one transaction: read the stored revisions of the batch's entities, judge every
record with the shared rule (`judge_in_order`), then upsert only each entity's winner; the
upsert's `WHERE entities.revision < excluded.revision` keeps the guard in the database too.
A batch of one record per entity first tries that upsert alone, without the lookup: when it
inserted or updated every row, every record was applied (new rows and newer revisions alike);
when it left a row alone (stored revision equal or higher) it is undone and the batch takes
the lookup. A batch that fits one statement (the inbox's 5,000 records) goes in as that
statement alone, its own transaction under the file's writer lock (`_insert_alone`); a larger
one as a transaction of several (`_upsert_unread`). Rows go in by INSERTs of up to 5,000 rows
each (`_statements`), not row by row: one GIL hand-off per statement, under the writer lock;
the rows, their keys and the statements' parameters are built before that lock is taken.
The file is separate from the state DB (data/sink.db) and has its own connection thread.
"""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from collections.abc import Sequence
from functools import cache
from itertools import chain
from pathlib import Path
from typing import Any

import orjson

from ingest import sqlite_params  # noqa: F401 - bytes and None bound without adaptation
from ingest.errors import IngestError, SinkError
from ingest.records import ReasonCode, Record, SinkResult, SinkStatus
from ingest.sinks.base import EntityKey, StoredRow, judge_batch
from ingest.state.sqlite import (
    Migration,
    SQLiteDB,
    autocommit,
    chunks,
    immediate,
    marks,
    writer_lock,
)

SINK_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        101,
        "entities",
        (
            "CREATE TABLE entities (tenant TEXT NOT NULL, entity_type TEXT NOT NULL,"
            " entity_id TEXT NOT NULL, revision INTEGER NOT NULL, deleted INTEGER NOT NULL,"
            " occurred_at TEXT, attributes TEXT, relations TEXT, dedupe_key BLOB,"
            " updated_at REAL, PRIMARY KEY (tenant, entity_type, entity_id)) WITHOUT ROWID",
            "CREATE VIEW live_entities AS SELECT * FROM entities WHERE deleted = 0",
        ),
    ),
    # The revision held before the last write: replays are judged against it (sinks/base.py).
    Migration(102, "prev_revision", ("ALTER TABLE entities ADD COLUMN prev_revision INTEGER",)),
    # A rowid table with the key as a UNIQUE index (was WITHOUT ROWID, keyed by it): an
    # update of a stored entity searches the key once, in the index, and then rewrites its
    # row where the rowid found it, in place when the row keeps its size. In a WITHOUT ROWID
    # table SQLite searches the key a second time to write the updated row (the upsert's
    # conflict check does not hand its position on), and that B-tree holds the whole rows,
    # so the two workers' interleaved keys spread an update batch over twice the pages.
    Migration(
        103,
        "entities_by_rowid",
        (
            "CREATE TABLE entities_by_rowid (tenant TEXT NOT NULL, entity_type TEXT NOT NULL,"
            " entity_id TEXT NOT NULL, revision INTEGER NOT NULL, deleted INTEGER NOT NULL,"
            " occurred_at TEXT, attributes TEXT, relations TEXT, dedupe_key BLOB,"
            " updated_at REAL, prev_revision INTEGER, UNIQUE (tenant, entity_type, entity_id))",
            "INSERT INTO entities_by_rowid SELECT tenant, entity_type, entity_id, revision,"
            " deleted, occurred_at, attributes, relations, dedupe_key, updated_at, prev_revision"
            " FROM entities",
            "DROP VIEW live_entities",
            "DROP TABLE entities",
            "ALTER TABLE entities_by_rowid RENAME TO entities",
            "CREATE VIEW live_entities AS SELECT * FROM entities WHERE deleted = 0",
        ),
    ),
)

_dumps = orjson.dumps
# Keys sorted: the text the compiled decoder slices out of its canonical bytes
# (`Record.sqlite_row`), so both paths store the same JSON text.
_SORTED = orjson.OPT_SORT_KEYS
_COLS = (
    "tenant, entity_type, entity_id, revision, deleted, occurred_at, attributes, relations,"
    " dedupe_key, updated_at"
)
_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_COLUMNS = _ROW.count("?")
_INTO = f"INSERT INTO entities ({_COLS}) VALUES "
_INSERT = _INTO + _ROW
_BACKOFF_FIRST, _BACKOFF_MAX = 4, 64  # lookup-first batches after an upsert left a row alone
# Rows per multi-row statement (`_write_rows`): a batch of the inbox's 5,000 records in one
# statement, 50,000 parameters at most (the library here allows 250,000); fewer where the
# library allows fewer parameters (`start`: SQLite's default is 32,766 since 3.32, 999
# before). See `_insert_alone` and `_upsert_unread` for why.
ROWS_PER_STATEMENT = 5000
# The upsert's SET, but for the new revision (the guarded and the strict upsert differ there).
_SET_FROM = (
    " ON CONFLICT (tenant, entity_type, entity_id) DO UPDATE SET prev_revision = entities.revision,"
)
_SET_REST = (
    " deleted = excluded.deleted,"
    " occurred_at = excluded.occurred_at, attributes = excluded.attributes,"
    " relations = excluded.relations, dedupe_key = excluded.dedupe_key,"
    " updated_at = excluded.updated_at"
)
_ON_CONFLICT = (
    _SET_FROM
    + " revision = excluded.revision,"
    + _SET_REST
    + " WHERE entities.revision < excluded.revision"
)
_UPSERT = _INSERT + _ON_CONFLICT
# The upsert of a batch written as one statement in its own transaction (`_insert_alone`): no
# WHERE; a row whose stored revision is equal or higher sets revision to NULL, which the
# column's NOT NULL refuses (`_STALE`), so the statement fails and undoes all of its rows
# instead of leaving that row alone: it writes every row or none.
_STRICT = (
    _SET_FROM
    + " revision = CASE WHEN entities.revision < excluded.revision THEN excluded.revision END,"
    + _SET_REST
)
_STALE = "NOT NULL constraint failed: entities.revision"
# sink.db's pages (a new file's; an existing one keeps its own): a batch writes a few hundred
# rows' worth of contiguous pages, and SQLite writes each page to the WAL as two write calls
# and, after another process's commit reset this connection's cache, reads each one again one
# call at a time: 16 KiB pages make a quarter of those calls (two writers of one sink.db,
# 1M records: 1.5 µs a record less of the sink threads' CPU; docs/benchmarks.md, embs).
PAGE_SIZE = 16384


@cache
def _rows_sql(n: int, tail: str) -> str:
    """INSERT of `n` rows in one statement, then `tail` (the upsert's ON CONFLICT, or "")."""
    return _INTO + ", ".join([_ROW] * n) + tail


def _statements(
    rows: Sequence[tuple[Any, ...]], tail: str, per: int
) -> list[tuple[str, tuple[Any, ...]]]:
    """`executemany(_INSERT + tail, rows)` as a few statements of up to `per` rows each, with
    their parameters flattened: built before the writer lock is taken (~0.8 ms of Python
    for 5,000 rows that the other workers' writes of the file no longer wait for).

    executemany binds and steps one row at a time and takes the GIL back for every row, so
    beside a busy event loop (decoding the next batch) the sink's thread waits for the GIL
    about once per row; a statement of many rows binds them in one C loop and then runs
    without the GIL. Its rows hold distinct entities (the callers write one row per entity),
    so the outcome is the row-by-row one; a statement that fails undoes all of its rows, and
    the callers roll back the whole attempt anyway.
    """
    flat = chain.from_iterable
    return [
        (_rows_sql(len(part), tail), tuple(flat(part)))
        for part in (rows[i : i + per] for i in range(0, len(rows), per))
    ]


def _execute(c: sqlite3.Connection, statements: list[tuple[str, tuple[Any, ...]]]) -> int:
    """Run `_statements`' statements; the rows inserted or updated (SQLite's changes(): an
    upsert's row that its WHERE left alone is not counted)."""
    changed = 0
    for sql, params in statements:
        changed += c.execute(sql, params).rowcount
    return changed


def _write_rows(c: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], tail: str, per: int) -> int:
    """`_statements` of `rows`, run: the rows inserted or updated."""
    return _execute(c, _statements(rows, tail, per))


def _stored_rows(c: sqlite3.Connection, keys: list[EntityKey]) -> dict[EntityKey, StoredRow]:
    """(revision, dedupe_key, prev_revision) of each entity present. Grouped by (tenant,
    entity_type) so each query is a primary-key search with an IN list on entity_id
    (row-value IN lists scan the table)."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for tenant, entity_type, entity_id in keys:
        groups[(tenant, entity_type)].append(entity_id)
    stored: dict[EntityKey, StoredRow] = {}
    for (tenant, entity_type), ids in groups.items():
        for part in chunks(ids):
            sql = (
                "SELECT entity_id, revision, dedupe_key, prev_revision FROM entities"
                f" WHERE tenant = ? AND entity_type = ? AND entity_id IN ({marks(len(part))})"
            )
            for entity_id, rev, dkey, prev in c.execute(sql, (tenant, entity_type, *part)):
                stored[(tenant, entity_type, entity_id)] = (rev, dkey, prev)
    return stored


def _classify(exc: sqlite3.Error) -> SinkError:
    """Whole-batch failures: a held lock is a timeout, anything else an unusable database."""
    msg = str(exc)
    lowered = msg.lower()
    if "locked" in lowered or "busy" in lowered:
        reason = ReasonCode.SINK_TIMEOUT
    else:
        reason = ReasonCode.CONNECTION_ERROR
    return SinkError(reason, msg, error_class=type(exc).__name__)


def _last_applied(keys: list[EntityKey], results: list[SinkResult]) -> list[int]:
    """Indexes of the rows to write: per entity its last APPLIED record, which is its
    `latest_per_entity` winner (highest revision, first among equals) newer than stored."""
    last: dict[EntityKey, int] = {}
    for j, (key, result) in enumerate(zip(keys, results, strict=True)):
        if result.status is SinkStatus.APPLIED:
            last[key] = j
    return list(last.values())


class SQLiteSink:
    """Implements ingest.sinks.base.Sink on a local SQLite file."""

    kind = "sqlite"

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = Path(path)
        self._db: SQLiteDB | None = None
        self.insert_skip = 0  # batches left that go to the lookup without trying the upsert
        self._backoff = _BACKOFF_FIRST
        # Batches by path: the upsert without a lookup, the lookup after that upsert left a
        # row alone, the lookup without trying (backoff, or several records of one entity);
        # read by tests.
        self.paths = {"insert": 0, "fallback": 0, "upsert": 0}
        self.rows_per_statement = ROWS_PER_STATEMENT  # tests set it small, to cross chunks

    async def start(self) -> None:
        if self._db is None:
            try:
                self._db = await SQLiteDB.open(self.path, SINK_MIGRATIONS, PAGE_SIZE)
                most = await self._db.run(
                    lambda c: c.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _ROW.count("?")
                )
            except IngestError as exc:
                raise SinkError(ReasonCode.CONNECTION_ERROR, str(exc)) from exc
            self.rows_per_statement = max(1, min(self.rows_per_statement, most))

    @property
    def db(self) -> SQLiteDB:
        if self._db is None:
            raise SinkError(ReasonCode.CONNECTION_ERROR, f"sink {self.name} is not started")
        return self._db

    @staticmethod
    def row_of(record: Record, now: float | None = None) -> tuple[Any, ...]:
        """The row write() stores for a record (the benchmark builds the same rows);
        `now` is the updated_at column, read once per batch by write()."""
        body = record.body
        deleted = 1 if record.deleted else 0
        attributes = body.get("attributes")
        relations = body.get("relations")
        return (
            record.tenant,
            record.entity_type,
            record.entity_id,
            record.revision,
            deleted,
            body.get("occurred_at"),
            None if deleted or attributes is None else _dumps(attributes, option=_SORTED).decode(),
            None
            if relations is None
            else (_dumps(relations, option=_SORTED).decode() if relations else "[]"),
            record.dedupe_key,
            time.time() if now is None else now,
        )

    @staticmethod
    def rows_of(records: Sequence[Record], now: float) -> list[tuple[Any, ...]]:
        """`row_of` of each record, from the row the compiled decoder built
        (`Record.sqlite_row`: all but updated_at) where there is one."""
        tail = (now,)
        row_of = SQLiteSink.row_of
        return [
            row_of(rec, now) if (lite := rec.sqlite_row) is None else lite + tail for rec in records
        ]

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        if not records:
            return []
        try:
            return await self.db.run(lambda c: self._write(c, list(records)))
        except sqlite3.Error as exc:
            raise _classify(exc) from exc

    def _write(self, c: sqlite3.Connection, records: list[Record]) -> list[SinkResult]:
        """In the DB thread. A row breaking a constraint is judged CONSTRAINT_VIOLATION and
        the batch is written again without it (its entity's next best record may win): the
        same outcome as `write_around_refused` (sinks/base.py) gives the other sinks."""
        bad: dict[int, SinkResult] = {}  # index in records -> failed result
        while True:
            # Until a row is refused (the usual case), the batch as it is and its results as
            # they come: no index lists or merge per record.
            live = [i for i in range(len(records)) if i not in bad] if bad else None
            batch = records if live is None else [records[i] for i in live]
            # The rows are built before the write lock is taken: the other processes' writes
            # of the file wait for this transaction (row_of is ~1.3 µs a record of Python,
            # holding the GIL; the compiled decoder's row plus updated_at ~0.1).
            rows = SQLiteSink.rows_of(batch, time.time())
            # So are the entity keys (the rows' first three columns), whether each entity
            # comes once, and the upsert's statements with their parameters flattened.
            keys: list[EntityKey] = [row[:3] for row in rows]
            unique = dict.fromkeys(keys)
            single = len(unique) == len(keys)
            upsert = _statements(rows, _ON_CONFLICT, self.rows_per_statement) if single else []
            try:
                alone = self._insert_alone(c, upsert) if upsert else None
                if alone:
                    results = [SinkResult.applied()] * len(batch)
                else:
                    with immediate(c):
                        results = self._write_once(
                            c, batch, rows, keys, unique, upsert, tried=alone is not None
                        )
            except (sqlite3.IntegrityError, OverflowError):
                found = self._find_bad(c, batch)
                if not found:
                    raise
                for j, result in found.items():
                    bad[j if live is None else live[j]] = result
                continue
            if live is None:
                return results
            merged = dict(zip(live, results, strict=True)) | bad
            return [merged[i] for i in range(len(records))]

    def _write_once(
        self,
        c: sqlite3.Connection,
        batch: list[Record],
        rows: list[tuple[Any, ...]],
        keys: list[EntityKey],
        unique: dict[EntityKey, None],
        upsert: list[tuple[str, tuple[Any, ...]]],
        tried: bool = False,
    ) -> list[SinkResult]:
        """Inside the write transaction: `rows[i]` is `row_of(batch[i])`, `keys[i]` its
        entity key, `unique` the keys in order without repeats, and `upsert` the
        `_statements` of all rows when no entity comes twice (else empty); `tried`: the
        upsert alone (`_insert_alone`) was just refused, straight to the lookup."""
        if tried:
            self.paths["fallback"] += 1
        elif not upsert:
            self.paths["upsert"] += 1
        elif self.insert_skip:
            self.insert_skip -= 1
            self.paths["upsert"] += 1
        elif self._upsert_unread(c, upsert, len(rows)):  # several statements
            self.paths["insert"] += 1
            return [SinkResult.applied()] * len(batch)
        else:
            self.paths["fallback"] += 1
        stored = _stored_rows(c, list(unique))
        if not stored and upsert:  # all new, one record each: all applied
            _execute(c, upsert)
            return [SinkResult.applied()] * len(batch)
        results = judge_batch(batch, stored)
        rows = [rows[j] for j in _last_applied(keys, results)]
        _write_rows(c, rows, _ON_CONFLICT, self.rows_per_statement)
        return results

    def _insert_alone(
        self, c: sqlite3.Connection, upsert: list[tuple[str, tuple[Any, ...]]]
    ) -> bool | None:
        """A batch of one record per entity that fits one statement, as that statement
        alone (`_STRICT`'s upsert), in its own transaction under the file's writer lock:
        True when it went in (every record applied), False with nothing written when a row
        has a stored revision equal or higher, or is refused (then the lookup judges the
        batch, `_write_once`), None when not tried (several statements; the backoff).

        Why: every statement under the writer lock returns to Python and must take the GIL
        back, and beside a busy event loop each of those waits up to the switch interval
        while the pod's other worker waits for the lock; BEGIN IMMEDIATE, the upsert and
        COMMIT were three such returns, this is one. SQLite runs a statement outside an
        explicit transaction as a transaction of its own: it takes the write lock when the
        statement begins (as BEGIN IMMEDIATE does, through the busy handler), and commits
        when it ends or undoes all of its changes when it fails, so a process killed at any
        instant leaves the whole batch written or none of it, as before. Exact as
        `_upsert_unread`: with one row per entity, `_STRICT` inserts or updates a row iff
        its entity is absent or stored older (then the lookup path judges the record
        APPLIED and writes the same row), and fails the statement otherwise, where the
        guarded upsert left the row alone and the transaction was rolled back."""
        if len(upsert) != 1 or self.insert_skip:
            return None
        _, params = upsert[0]
        strict = _rows_sql(len(params) // _COLUMNS, _STRICT)
        try:
            autocommit(c, strict, params)
        except (sqlite3.IntegrityError, OverflowError) as exc:
            if _STALE in str(exc):  # a stored revision equal or higher: back off
                self._fall_back()
            return False
        self.paths["insert"] += 1
        self._backoff = _BACKOFF_FIRST
        return True

    def _fall_back(self) -> None:
        """An upsert without the lookup left a row alone: the next `insert_skip` batches go
        straight to the lookup, 4, then 8 ... 64 after each further fall-back."""
        self.insert_skip = self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _upsert_unread(
        self, c: sqlite3.Connection, upsert: list[tuple[str, tuple[Any, ...]]], n: int
    ) -> bool:
        """A batch of one record per entity as the guarded upsert alone, without looking its
        entities up first: True when it inserted or updated every row, False with nothing
        written when it left a row alone or a row is refused (then the lookup and upsert
        judge the batch). Exact: with one row per entity, a row is inserted or updated iff
        its entity is not stored or stored at a lower revision, which is when the lookup path
        judges its record APPLIED and writes the same row with the same upsert; a row left
        alone (stored revision equal or higher: UNCHANGED or OLDER_REVISION, which only the
        stored revision tells) makes SQLite's count of changed rows fall short of the batch.
        A feed of new rows and a feed of newer revisions both go in without it; the
        lookup (a SELECT stepping once per stored row, each step a GIL hand-back under the
        writer lock, and `judge_batch` in Python) is left to batches with stale or repeated
        records. After a batch fell back, the next 4, then 8 ... 64 batches go to the lookup
        at once: a feed of replays pays one undone upsert per attempt.

        Reached for a batch of several statements (one that fits a statement goes in by
        `_insert_alone`), so inside a savepoint: a failed or short statement undoes the
        statements before it too. `upsert` is the `_statements` of the batch's `n` rows,
        built before the lock was taken."""
        c.execute("SAVEPOINT new_rows")
        try:
            changed = _execute(c, upsert)
        except (sqlite3.IntegrityError, OverflowError):
            c.execute("ROLLBACK TO new_rows")
            c.execute("RELEASE new_rows")
            return False
        if changed < n:
            c.execute("ROLLBACK TO new_rows")
            c.execute("RELEASE new_rows")
            self._fall_back()
            return False
        c.execute("RELEASE new_rows")
        self._backoff = _BACKOFF_FIRST
        return True

    @staticmethod
    def _find_bad(c: sqlite3.Connection, batch: list[Record]) -> dict[int, SinkResult]:
        """Write every row `_write_once` would write alone, inside a transaction that is
        rolled back, to name the ones the database refuses (a failed statement undoes only
        itself). Only those can be refused: a record its batch supersedes, or one older than
        stored, is never written, so it is judged by the revision rule (sinks/base.py)."""
        found: dict[int, SinkResult] = {}
        with writer_lock(c):
            c.execute("BEGIN IMMEDIATE")
            try:
                keys = [rec.entity_key for rec in batch]
                stored = _stored_rows(c, list(dict.fromkeys(keys)))
                for j in _last_applied(keys, judge_batch(batch, stored)):
                    rec = batch[j]
                    try:
                        c.execute(_UPSERT, SQLiteSink.row_of(rec))
                    except (sqlite3.IntegrityError, OverflowError) as exc:
                        found[j] = SinkResult.failed(
                            ReasonCode.CONSTRAINT_VIOLATION,
                            error_class=type(exc).__name__,
                            message=str(exc),
                        )
            finally:
                c.execute("ROLLBACK")
        return found

    async def bulk_insert_raw(
        self, rows: Sequence[tuple[Any, ...]], multi_row: bool = False, upsert: bool = False
    ) -> None:
        """Benchmark limit: plain INSERT of prepared rows, one transaction, no guard; by
        `executemany`, or (`multi_row`) in statements of `rows_per_statement` rows; `upsert`:
        the guarded upsert's statements instead (what SQLite itself does for an update)."""
        tail = _ON_CONFLICT if upsert else ""

        def write(c: sqlite3.Connection) -> None:
            with immediate(c):
                if multi_row:
                    _write_rows(c, rows, tail, self.rows_per_statement)
                else:
                    c.executemany(_INSERT + tail, rows)

        try:
            await self.db.run(write)
        except sqlite3.Error as exc:
            raise _classify(exc) from exc

    async def count(self, live_only: bool = False) -> int:
        """Rows in the table, tombstones included unless `live_only`."""
        table = "live_entities" if live_only else "entities"
        row = await self.db.run(lambda c: c.execute(f"SELECT count(*) FROM {table}").fetchone())
        return int(row[0])

    async def fetch(self, tenant: str, entity_type: str, entity_id: str) -> dict[str, Any] | None:
        """The stored row (tombstones included) with JSON columns decoded."""
        sql = f"SELECT {_COLS} FROM entities WHERE tenant = ? AND entity_type = ? AND entity_id = ?"
        params = (tenant, entity_type, entity_id)
        row = await self.db.run(lambda c: c.execute(sql, params).fetchone())
        if row is None:
            return None
        out = dict(zip([n.strip() for n in _COLS.split(",")], row, strict=True))
        out["deleted"] = bool(out["deleted"])
        for col in ("attributes", "relations"):
            if out[col] is not None:
                out[col] = orjson.loads(out[col])
        return out

    async def health(self) -> dict[str, Any]:
        connected = self._db is not None
        if connected:
            try:
                await self.db.run(lambda c: c.execute("SELECT 1").fetchone())
            except (sqlite3.Error, IngestError):
                connected = False
        return {"connected": connected, "target": str(self.path), "kind": self.kind}

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()
