"""Postgres sink: binary COPY straight into the table for new entities, else binary COPY into
a temp staging table and one revision-guarded upsert.

Per batch: `latest_per_entity` picks one winner per entity. First, optimistically, the winners
go by one binary COPY straight into the table (its own transaction, committed when it
returns): when no winner's entity is stored yet it succeeds, every winner is written and
nothing was stored before, which is all judging needs, at about half the server CPU of the
upsert. One stored entity makes the whole COPY fail (unique_violation, nothing written), and
the batch takes the upsert below; after such a fallback the next batches of the table go
straight to the upsert (4, then 8, ... up to 64 batches while COPYs keep failing) so an
update-heavy stream does not pay twice. A row error or a time the client cannot encode exactly
as the server would also sends the batch to the upsert, which says which row broke it.

The upsert: the winners go by binary COPY
into a per-connection TEMP table (ON COMMIT DELETE ROWS; `occurred_at` as a timestamptz when
the client can encode every one exactly, as in the straight COPY, else as text the server
casts), and ONE statement both applies the winners, update first (`UPDATE ... FROM` the
staging table `WHERE <table>.revision < <staged>.revision`, then, only for what that did not
write, the guarded `INSERT ... ON CONFLICT DO UPDATE` of the entities the statement's snapshot
does not hold), and returns, from the statement's snapshot (before the write), the stored
revision of the entities that need it for judging (several records in the batch, or a winner
the guard refused). The sink's connections plan it as index probes and never JIT-compile
(`_SETTINGS`).
A batch of one record per entity first tries that UPDATE alone, in the same transaction after
the staging COPY, and commits it only when it wrote every staged row (all applied: what the
statement would say); otherwise the transaction is rolled back whole and the batch takes the
statement (`_run`, `bare_skip`).
`judge_in_order` turns that into one result per record. Tombstones keep their row
(deleted = true, attributes NULL) so an older revision cannot resurrect the entity.
The table is created with a `fillfactor` (default 50) so that a revision update finds room on
its row's page: a HOT update, no new index entry (docs/postgres.md).

Error classification (once, here):
    QueryCanceledError (statement_timeout), a query past the client timeout -> SINK_TIMEOUT
    DeadlockDetectedError, LockNotAvailableError (another writer)  -> SINK_TIMEOUT, conflict
    TooManyConnectionsError                                          -> RATE_LIMITED
    connection refused / lost: OSError, PostgresConnectionError,
    InterfaceError, CannotConnectNowError, connect/acquire timeout   -> CONNECTION_ERROR
    IntegrityConstraintViolationError or DataError in the upsert     -> bisect the batch;
        only the row that breaks it gets CONSTRAINT_VIOLATION (constraint, message), and
        its entity's other records are written again without it (`write_around_refused`)
The sink never retries: the worker's retry layer does (after a server restart the pool's idle
connections are dead; the retry's fresh one is not).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no stubs; see docs/postgres.md
import orjson

from ingest.errors import SinkError
from ingest.records import ReasonCode, Record, SinkResult
from ingest.sinks.base import (
    EntityKey,
    StoredRow,
    judge_batch,
    latest_per_entity,
    write_around_refused,
)
from ingest.state.postgres import ddl_once

_ENTITY_KEY = attrgetter("entity_key")

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
COLUMNS = (
    "tenant",
    "entity_type",
    "entity_id",
    "revision",
    "deleted",
    "occurred_at",
    "attributes",
    "relations",
    "dedupe_key",
)
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
)
_ROW_ERRORS = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)
# Staged columns that need a cast on the way into the real table (see _stage_ddl).
_STAGED = {"occurred_at": "occurred_at::timestamptz"}
_JSONB = b"\x01"  # jsonb's binary format: a version byte, then the JSON text
_EMPTY_LIST = _JSONB + b"[]"
_BACKOFF_FIRST, _BACKOFF_MAX = 4, 64  # upsert-only batches after a failed straight COPY
_TIMES_KEPT = 4096  # occurred_at strings remembered with their datetime (or None)
# Binary COPY framing for rows the compiled decoder wrote (`Record.copy_row`: 9 fields).
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no extension
_COPY_TRAILER = b"\xff\xff"
_NINE, _TEN = b"\x00\x09", b"\x00\x0a"  # field counts: the table's row, the staging row
_MIN_REV = struct.Struct(">iq").pack  # the staging row's 10th field: length 8, int8
# Planner settings of the sink's connections. The upsert's UPDATE joins the staging table to
# the table: a probe of the primary key per staged row is what it must do whatever the
# planner estimates for a never-analysed temp table (a hash join read every row of a 100k
# table for a 5,000-row batch). No JIT: the upsert's estimated cost passes jit_above_cost
# from ~7,500 staged rows, and then every statement compiled (EXPLAIN ANALYZE, 10,000 rows:
# ~290 ms of compiling for a statement that runs in ~200-400 ms); nothing the sink runs gains
# from it. The judging's other joins are hashed subplans, which these do not touch.
_SETTINGS = {"enable_hashjoin": "off", "enable_mergejoin": "off", "jit": "off"}


def _ddl(t: str, fillfactor: int = 100) -> str:
    return f"""
CREATE TABLE IF NOT EXISTS {t} (
    tenant      text        NOT NULL,
    entity_type text        NOT NULL,
    entity_id   text        NOT NULL,
    revision    bigint      NOT NULL,
    deleted     boolean     NOT NULL DEFAULT false,
    occurred_at timestamptz,
    attributes  jsonb,
    relations   jsonb,
    dedupe_key  bytea       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, entity_type, entity_id),
    CONSTRAINT {t}_valid CHECK (revision >= 0 AND length(entity_id) <= 256)
) WITH (fillfactor = {int(fillfactor)});
DO $$ DECLARE lock_wait text := current_setting('lock_timeout'); BEGIN
    -- each ALTER only when needed: it waits behind any VACUUM or write of the table
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{t}'::regclass
            AND attname = 'prev_revision' AND NOT attisdropped) THEN
        ALTER TABLE {t} ADD COLUMN prev_revision bigint;
    END IF;
    IF NOT coalesce((SELECT 'fillfactor={int(fillfactor)}' = ANY(reloptions)
            FROM pg_class WHERE oid = '{t}'::regclass), false) THEN
        -- an optimisation: never wait long for it (an anti-wraparound VACUUM is never
        -- cancelled, and every worker of the pod waits behind this lock); a later start
        -- applies it
        PERFORM set_config('lock_timeout', '3s', true);
        BEGIN
            ALTER TABLE {t} SET (fillfactor = {int(fillfactor)});
        EXCEPTION WHEN lock_not_available THEN
            RAISE WARNING 'fillfactor of % left as it is: the table is busy', '{t}';
        END;
        PERFORM set_config('lock_timeout', lock_wait, true);
    END IF;
END $$;
CREATE OR REPLACE VIEW {t}_live AS SELECT * FROM {t} WHERE NOT deleted;
"""


def _stage_ddl(t: str, timed: bool) -> str:
    """A per-connection staging table. `occurred_at` arrives as a timestamptz (`timed`:
    `_stage4_`, encoded by the client as the straight COPY does, when every one in the batch
    is exact, see `_when`) or as the record's RFC 3339 text (`_stage3_`, cast by the server
    while inserting into the real table: ~1 µs of server CPU a row); the JSON columns as
    jsonb's wire bytes, as in the straight COPY (`_rows`): asyncpg's C codecs encode text and
    pass the bytes through (`_init_conn`), so a row costs no Python call. (`_stage2_` took
    the JSON as bytea and cast it in the upsert: a row then kept `orjson.dumps`'s own bytes
    object, which costs ~3 µs of allocator work a row, mostly page faults, where a copy with
    the version byte in front costs ~0.1 µs.)"""
    return (
        f"CREATE TEMP TABLE IF NOT EXISTS {_stage(t, timed)} ("
        " tenant text, entity_type text, entity_id text, revision bigint, deleted boolean,"
        f" occurred_at {'timestamptz' if timed else 'text'}, attributes jsonb, relations jsonb,"
        " dedupe_key bytea, min_rev bigint) ON COMMIT DELETE ROWS"
    )


def _stage(t: str, timed: bool) -> str:
    return f"_stage4_{t}" if timed else f"_stage3_{t}"


def _upsert_sql(t: str, timed: bool) -> str:
    """The write, plus only what judging needs: entities with several records in the batch
    (their stored revision) and winners the guard refused. The common batch, one record per
    entity and all applied, returns no rows and skips the anti-join (a one-time filter).

    Update first: stored entities take a plain guarded `UPDATE ... FROM` the staging table
    (an index probe and a HOT update a row: no tuple lock, so one WAL record a row where
    `INSERT ... ON CONFLICT DO UPDATE` writes two, a lock and the update, and a refused row
    is not locked at all). Only when it did not write every staged row (new entities, or
    refused ones) does the guarded `INSERT ... ON CONFLICT` run, for the staged entities the
    statement's snapshot does not hold: one the UPDATE saw is never touched twice, and one
    another writer inserted since meets the ON CONFLICT guard as before. Concurrent writers:
    the UPDATE re-checks its guard on the row version it waited for (READ COMMITTED), as the
    ON CONFLICT did. What judging reads of the stored rows is one probe a row (a left join),
    not one per column. The plan must be a nested loop of index probes (`_SETTINGS`).
    Measured (docs/benchmarks.md, "update first"): server CPU of revision updates -1.8 to
    -2.0 µs a record, of replays and older revisions -9 µs, ~56 bytes of WAL less a row.

    Parameters: $1 the number of staged rows (the client knows it: counting the staging
    table scanned it twice more), $2 whether an entity has several records in the batch (only
    then can a row have min_rev < revision: otherwise the last branch is a one-time filter, not
    a scan). The judging branch's guard counts `upd` and `ins`, not `up`, so the common batch
    never materialises `up` (docs/benchmarks.md, "the statement's counts")."""
    cols = ", ".join(COLUMNS)
    staged = ", ".join(c if timed else _STAGED.get(c, c) for c in COLUMNS)
    stage = _stage(t, timed)
    sets = (
        f"prev_revision = {t}.revision, "
        + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[3:])
        + ", updated_at = now()"
    )
    update_sets = (
        "prev_revision = o.revision, "
        + ", ".join(f"{c} = s.{c if timed else _STAGED.get(c, c)}" for c in COLUMNS[3:])
        + ", updated_at = now()"
    )
    key = "o.tenant = s.tenant AND o.entity_type = s.entity_type AND o.entity_id = s.entity_id"
    keys = "(s.tenant, s.entity_type, s.entity_id)"
    stored = f"o.revision, o.dedupe_key, o.prev_revision FROM {stage} s LEFT JOIN {t} o ON {key}"
    return f"""
WITH upd AS (
    UPDATE {t} o SET {update_sets} FROM {stage} s
    WHERE {key} AND o.revision < s.revision
    RETURNING o.tenant, o.entity_type, o.entity_id
), ins AS (
    INSERT INTO {t} ({cols}, updated_at) SELECT {staged}, now() FROM {stage} s
    WHERE (SELECT count(*) FROM upd) < $1::bigint
      AND NOT EXISTS (SELECT 1 FROM {t} o WHERE {key})
    ON CONFLICT (tenant, entity_type, entity_id) DO UPDATE SET {sets}
    WHERE {t}.revision < excluded.revision
    RETURNING tenant, entity_type, entity_id
), up AS (
    SELECT * FROM upd UNION ALL SELECT * FROM ins
)
SELECT s.tenant, s.entity_type, s.entity_id, false, {stored}
WHERE (SELECT count(*) FROM upd) + (SELECT count(*) FROM ins) < $1::bigint
  AND s.min_rev = s.revision AND {keys} NOT IN (SELECT * FROM up)  -- a hashed subplan
UNION ALL
SELECT s.tenant, s.entity_type, s.entity_id, {keys} IN (SELECT * FROM up), {stored}
WHERE $2::boolean AND s.min_rev < s.revision
"""


def _bare_sql(t: str, timed: bool) -> str:
    """The upsert's UPDATE alone, answering how many rows it wrote. For a batch of one record
    per entity, that count equal to the staged rows means every winner was written, which is
    all the upsert would have said (it returns nothing then); the upsert's other parts (the
    insert, the judging, their guards) cost ~0.3 µs a record of server CPU more
    (docs/benchmarks.md, "the bare UPDATE")."""
    update_sets = (
        "prev_revision = o.revision, "
        + ", ".join(f"{c} = s.{c if timed else _STAGED.get(c, c)}" for c in COLUMNS[3:])
        + ", updated_at = now()"
    )
    key = "o.tenant = s.tenant AND o.entity_type = s.entity_type AND o.entity_id = s.entity_id"
    return (
        f"WITH upd AS (UPDATE {t} o SET {update_sets} FROM {_stage(t, timed)} s"
        f" WHERE {key} AND o.revision < s.revision RETURNING 1) SELECT count(*) FROM upd"
    )


class _Short(Exception):
    """The bare UPDATE wrote fewer rows than were staged: its transaction is rolled back."""


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # timestamptz on the wire: µs since this
_MICROSECOND = timedelta(microseconds=1)
_INFINITY = 2**63 - 1
Micros = tuple[int]  # a timestamptz in asyncpg's tuple format


def _when(occurred: str) -> Micros | None:
    """`occurred_at` as the timestamptz the server's `::timestamptz` makes of it, in asyncpg's
    tuple format (encoded in C, where a datetime costs ~0.8 µs of Python per row), or None
    where the client cannot promise the same value (no offset: the server reads it in its
    TimeZone; more than 6 fraction digits: the server rounds, Python truncates)."""
    try:
        when = datetime.fromisoformat(occurred)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    dot = occurred.find(".")
    if dot >= 0:
        end = dot + 1
        while end < len(occurred) and occurred[end].isdigit():
            end += 1
        if end - dot - 1 > 6:
            return None
    return ((when - _PG_EPOCH) // _MICROSECOND,)


def _micros(value: datetime) -> Micros:
    """A datetime (naive = the process's local time, as asyncpg reads it) as the `_when`
    tuple: microseconds since 2000-01-01 UTC."""
    return ((value.astimezone(UTC) - _PG_EPOCH) // _MICROSECOND,)


def _timestamptz_decode(value: Micros) -> datetime:
    """What asyncpg's own codec returns: an aware UTC datetime (infinities: its max / min)."""
    micros = value[0]
    if micros >= _INFINITY:
        return datetime.max.replace(tzinfo=UTC)
    if micros <= -_INFINITY - 1:
        return datetime.min.replace(tzinfo=UTC)
    return _PG_EPOCH + timedelta(microseconds=micros)


def _rows(
    winners: Sequence[Record],
    low: dict[EntityKey, int] | None,
    times: dict[str, Micros | None] | None,
    staged: bool,
) -> list[tuple[Any, ...]] | None:
    """Straight COPY rows (`COLUMNS`) or, `staged`, staging rows (plus `min_rev`, from `low`).
    `occurred_at` as text (`times` None) or as a timestamptz, parsed once per distinct text
    through `times` (None when one is not exact, see `_when`). Both carry the JSON columns
    with jsonb's version byte in front, as the wire wants them: a new bytes object, so the
    row never keeps `orjson.dumps`'s own (a large allocation shrunk in place: keeping 2,000
    of them alive costs ~3 µs a row, mostly page faults; the copy ~0.1 µs). One loop for
    both: a row costs no Python call beyond what its JSON columns need, and asyncpg's
    encoders of these rows are C builtins that return the values as they are (`_init_conn`)."""
    dumps = orjson.dumps
    version, empty = _JSONB, _EMPTY_LIST
    rows: list[tuple[Any, ...]] = []
    for rec in winners:
        body = rec.body
        deleted = rec.deleted
        if deleted:
            attributes = relations = None
        else:
            attributes = body.get("attributes")
            if attributes is not None:
                attributes = version + dumps(attributes)
            relations = body.get("relations")
            if relations is not None:
                relations = version + dumps(relations) if relations else empty
        occurred = body.get("occurred_at")
        if times is not None and occurred is not None:
            when = times.get(occurred, False)
            if when is False:
                when = times[occurred] = _when(occurred)
            if when is None:
                return None
            occurred = when
        if not staged:
            rows.append(
                (
                    rec.tenant,
                    rec.entity_type,
                    rec.entity_id,
                    rec.revision,
                    deleted,
                    occurred,
                    attributes,
                    relations,
                    rec.dedupe_key,
                )
            )
        else:  # the same row plus `min_rev`, built at once (a copy of a 9-tuple: ~0.3 µs)
            rows.append(
                (
                    rec.tenant,
                    rec.entity_type,
                    rec.entity_id,
                    rec.revision,
                    deleted,
                    occurred,
                    attributes,
                    relations,
                    rec.dedupe_key,
                    rec.revision if low is None else low[rec.entity_key],
                )
            )
    return rows


def _wired(winners: Sequence[Record]) -> bool:
    """Every winner carries its binary COPY row (`Record.copy_row`)."""
    return all(rec.copy_row is not None for rec in winners)


def _copy_payload(winners: Sequence[Record]) -> bytes:
    """The straight COPY's whole binary payload: header, one row a winner, trailer."""
    parts = [_COPY_HEADER]
    append = parts.append
    for rec in winners:
        append(_NINE)
        append(rec.copy_row)  # type: ignore[arg-type]  # `_wired` checked
    append(_COPY_TRAILER)
    return b"".join(parts)


def _wire_rows(
    winners: Sequence[Record], low: dict[EntityKey, int] | None
) -> list[tuple[Any, ...]]:
    """Staging rows from `Record.copy_row`, `_run`'s `wired` form: (tenant, entity_type,
    entity_id, revision, the row in binary COPY format with `min_rev` (from `low`) added): the
    key and revision first, as `_apply` reads them off any staging row."""
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    for rec in winners:
        low_rev = rec.revision if low is None else low[rec.entity_key]
        wire = _TEN + rec.copy_row + _MIN_REV(8, low_rev)  # type: ignore[operator]
        append((rec.tenant, rec.entity_type, rec.entity_id, rec.revision, wire))
    return rows


def _stage_payload(rows: Sequence[tuple[Any, ...]]) -> bytes:
    return b"".join([_COPY_HEADER, *[row[4] for row in rows], _COPY_TRAILER])


async def _one(payload: bytes) -> Any:
    """`payload` as the async iterable asyncpg's `copy_to_table` reads."""
    yield payload


def _jsonb_decode(data: bytes) -> Any:
    return orjson.loads(data[1:])


class PostgresSink:
    """Sink on one table (layout in docs/postgres.md), created by `start()` if absent."""

    kind = "postgres"

    def __init__(
        self,
        name: str,
        dsn: str,
        table: str = "entities",
        statement_timeout_ms: int = 30000,
        fillfactor: int = 50,
    ) -> None:
        if not _IDENT.match(table):
            raise ValueError(f"table name {table!r} must match {_IDENT.pattern}")
        if not 10 <= fillfactor <= 100:
            raise ValueError(f"fillfactor {fillfactor} must be within 10..100")
        self.name = name
        self.table = table
        self.fillfactor = fillfactor
        self._dsn = dsn
        self._timeout_ms = statement_timeout_ms
        self._pool: asyncpg.Pool | None = None
        self.copy_skip = 0  # batches left that go straight to the upsert (after a fallback)
        self._backoff = _BACKOFF_FIRST
        self._times: dict[str, Micros | None] = {}
        # Batches by path: written by the straight COPY, sent to the upsert after it failed,
        # sent to the upsert without trying (backoff). Read by tests and benches.
        self.paths = {"copy": 0, "fallback": 0, "upsert": 0}
        self._upserts = {timed: _upsert_sql(table, timed) for timed in (True, False)}
        self._bares = {timed: _bare_sql(table, timed) for timed in (True, False)}
        # One-record-an-entity batches go by the bare UPDATE first (`_run`); after one it could
        # not write whole, the next `bare_skip` such batches do not try (4, 8, ... up to 64
        # while they keep falling short), so a stream of refusals pays it rarely.
        self.bare_skip = 0
        self._bare_backoff = _BACKOFF_FIRST
        self.bare = {"written": 0, "short": 0}  # batches by outcome; read by tests and benches
        self._target = re.sub(r"//[^@/]*@", "//", dsn)

    async def _init_conn(self, conn: asyncpg.Connection) -> None:
        # The encoders only pass values through (`tuple` and `bytes` return a tuple / bytes
        # object itself), in C: the rows carry a timestamptz as `_when`'s tuple and a jsonb as
        # its wire bytes (`_rows`, `copy_raw`). A Python encoder cost a call per value.
        await conn.set_type_codec(
            "timestamptz",
            encoder=tuple,
            decoder=_timestamptz_decode,
            schema="pg_catalog",
            format="tuple",
        )
        await conn.set_type_codec(
            "jsonb",
            encoder=bytes,
            decoder=_jsonb_decode,
            schema="pg_catalog",
            format="binary",
        )
        await conn.execute(_stage_ddl(self.table, True))
        await conn.execute(_stage_ddl(self.table, False))

    async def start(self) -> None:
        try:
            conn = await asyncpg.connect(self._dsn, timeout=2.0)
            try:
                await ddl_once(
                    conn, _ddl(self.table, self.fillfactor)
                )  # a pod's workers start together
            finally:
                await conn.close()
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=4,
                timeout=2.0,
                command_timeout=self._timeout_ms / 1000 + 10,
                server_settings={"statement_timeout": str(self._timeout_ms), **_SETTINGS},
                init=self._init_conn,
            )
        except Exception as exc:
            raise _classify(exc, connecting=True) from exc

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise SinkError(ReasonCode.CONNECTION_ERROR, f"sink {self.name} is not started")
        return self._pool

    @staticmethod
    def row_of(record: Record) -> tuple[Any, ...]:
        """The row write() stores (without updated_at, which the server sets)."""
        body = record.body
        deleted = bool(body.get("deleted", False))
        attributes = body.get("attributes")
        relations = body.get("relations")
        occurred = body.get("occurred_at")
        return (
            record.tenant,
            record.entity_type,
            record.entity_id,
            record.revision,
            deleted,
            None if occurred is None else datetime.fromisoformat(occurred),
            None if deleted or attributes is None else orjson.dumps(attributes),
            None if deleted or relations is None else orjson.dumps(relations),
            record.dedupe_key,
        )

    @staticmethod
    def stage_rows(
        winners: Sequence[Record], low: dict[EntityKey, int] | None = None
    ) -> list[tuple[Any, ...]]:
        """The staging rows of a batch's winners (layout in `_stage_ddl`); `low` is each
        entity's lowest revision in the batch (None: one record per entity)."""
        rows = _rows(winners, low, None, True)
        assert rows is not None  # only a timestamptz can be refused
        return rows

    def staged_rows(
        self, winners: Sequence[Record], low: dict[EntityKey, int] | None = None
    ) -> tuple[list[tuple[Any, ...]], bool]:
        """(rows, timed): the staging rows with `occurred_at` as a timestamptz (timed) when
        the client can encode every one exactly, else as text (`stage_rows`)."""
        if len(self._times) >= _TIMES_KEPT:
            self._times.clear()
        rows = _rows(winners, low, self._times, True)
        if rows is not None:
            return rows, True
        return self.stage_rows(winners, low), False

    def copy_rows(self, winners: Sequence[Record]) -> list[tuple[Any, ...]] | None:
        """The rows of a straight COPY of the winners into the table (`COLUMNS`), or None
        when an `occurred_at` is one only the server can read exactly (see `_when`)."""
        if len(self._times) >= _TIMES_KEPT:
            self._times.clear()
        return _rows(winners, None, self._times, False)

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        """A straight COPY when every entity is new, else one staging COPY + one upsert; a
        refused row fails alone (sinks/base.py)."""
        if not records:
            return []
        return await write_around_refused(records, self._write_once)

    async def _write_once(
        self, records: Sequence[Record]
    ) -> tuple[list[SinkResult], dict[EntityKey, SinkResult]]:
        """A batch with one record per entity whose rows all applied (what the statement says
        by returning nothing) is judged in one step. Returns the refused winners apart."""
        single = len(set(map(_ENTITY_KEY, records))) == len(records)
        winners: Sequence[Record] = records if single else latest_per_entity(records)
        if self.copy_skip:
            self.copy_skip -= 1
            self.paths["upsert"] += 1
        elif await self._copy_new(winners):
            self.paths["copy"] += 1
            if single:
                return [SinkResult.applied()] * len(records), {}
            return judge_batch(records, {}, {w.entity_key for w in winners}), {}
        else:
            self.paths["fallback"] += 1
        low: dict[EntityKey, int] | None = None
        if not single:
            low = {}
            for rec in records:
                key = rec.entity_key
                if key not in low or rec.revision < low[key]:
                    low[key] = rec.revision
        wired = _wired(winners)
        if wired:
            rows, timed = _wire_rows(winners, low), True
        else:
            rows, timed = self.staged_rows(winners, low)
        stored: dict[EntityKey, StoredRow] = {}
        refused: set[EntityKey] = set()
        bad: dict[EntityKey, SinkResult] = {}
        await self._apply(rows, timed, stored, refused, bad, wired, several=low is not None)
        if single and not stored and not refused and not bad:
            return [SinkResult.applied()] * len(records), bad
        # A winner refused although the statement's snapshot held nothing newer lost a race
        # with a concurrent writer (another worker replaying the same records after a
        # rebalance, say). Judge it against what that writer committed, read now: an equal
        # revision is then UNCHANGED, not OLDER_REVISION.
        raced = [
            w.entity_key
            for w in winners
            if w.entity_key in refused
            and (w.entity_key not in stored or stored[w.entity_key][0] < w.revision)
        ]
        if raced:
            stored.update(await self._current(raced))
            refused.difference_update(raced)
        written = {w.entity_key for w in winners} - refused - bad.keys()
        return judge_batch(records, stored, written), bad

    async def _copy_new(self, winners: Sequence[Record]) -> bool:
        """COPY `winners` straight into the table, its own transaction: True when written
        (no entity was stored), False when nothing was and the batch needs the upsert."""
        payload: bytes | None = None
        rows: list[tuple[Any, ...]] | None = None
        if _wired(winners):  # rows the compiled decoder wrote: one buffer, no encoding here
            payload = _copy_payload(winners)
        else:
            rows = self.copy_rows(winners)
            if rows is None:
                return False
        try:
            conn = await self.pool.acquire(timeout=2.0)
        except Exception as exc:
            raise _classify(exc, connecting=True) from exc
        try:
            if payload is not None:
                await conn.copy_to_table(
                    self.table, source=_one(payload), columns=COLUMNS, format="binary"
                )
            else:
                await conn.copy_records_to_table(self.table, records=rows, columns=COLUMNS)
        except asyncpg.UniqueViolationError:
            self.copy_skip = self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
            return False
        except _ROW_ERRORS:
            return False  # the upsert's bisection names the row
        except Exception as exc:
            if isinstance(exc, asyncio.TimeoutError):
                # No answer within the client timeout: resetting this connection for the
                # pool would wait on the same silent server, so drop it.
                conn.terminate()
            raise _classify(exc) from exc
        finally:
            await self._release(conn)
        self._backoff = _BACKOFF_FIRST
        return True

    async def _current(self, keys: list[EntityKey]) -> dict[EntityKey, StoredRow]:
        """The committed (revision, dedupe_key, prev_revision) of `keys`, read now."""
        sql = (
            f"SELECT tenant, entity_type, entity_id, revision, dedupe_key, prev_revision"
            f" FROM {self.table} WHERE (tenant, entity_type, entity_id) IN"
            " (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))"
        )
        try:
            async with self.pool.acquire(timeout=2.0) as conn:
                found = await conn.fetch(sql, *(list(col) for col in zip(*keys, strict=True)))
        except Exception as exc:
            raise _classify(exc) from exc
        return {(r[0], r[1], r[2]): (r[3], r[4], r[5]) for r in found}

    async def _held(self, key: EntityKey) -> StoredRow | None:
        """What is stored for a refused row's entity; None also when the key itself is what
        the server refuses (a NUL in an id cannot even be looked up)."""
        try:
            return (await self._current([key])).get(key)
        except SinkError as exc:
            if isinstance(exc.__cause__, _ROW_ERRORS):
                return None
            raise

    async def _apply(
        self,
        rows: list[tuple[Any, ...]],
        timed: bool,
        stored: dict[EntityKey, StoredRow],
        refused: set[EntityKey],
        bad: dict[EntityKey, SinkResult],
        wired: bool = False,
        several: bool = True,
    ) -> None:
        """Upsert `rows` (`wired`: `_wire_rows`'s; `several`: an entity may have several rows,
        i.e. a row's min_rev may be below its revision); on a row-level error, bisect so only
        the offending rows fail."""
        try:
            bare = not several and self._bare_turn()
            if bare and await self._run(rows, timed, wired, several, bare=True) is not None:
                return  # every staged row written: nothing stored to judge by
            out = await self._run(rows, timed, wired, several) or []  # (None: bare only)
        except _ROW_ERRORS as exc:
            if len(rows) == 1:
                key: EntityKey = (rows[0][0], rows[0][1], rows[0][2])
                held = await self._held(key)
                if held is not None and held[0] >= rows[0][3]:
                    # The guard would not have written it (the cast failed before the guard
                    # was asked): an older row is judged by the revision rule, not refused.
                    stored[key] = held
                    refused.add(key)
                    return
                bad[key] = SinkResult.failed(
                    ReasonCode.CONSTRAINT_VIOLATION,
                    error_class=type(exc).__name__,
                    constraint=getattr(exc, "constraint_name", None),
                    message=str(exc),
                    incoming_revision=rows[0][3],
                )
                return
            mid = len(rows) // 2
            await self._apply(rows[:mid], timed, stored, refused, bad, wired, several)
            await self._apply(rows[mid:], timed, stored, refused, bad, wired, several)
            return
        for tenant, etype, eid, was_written, revision, dedupe_key, prev_revision in out:
            key = (tenant, etype, eid)
            if revision is not None:
                stored[key] = (revision, dedupe_key, prev_revision)
            if not was_written:
                refused.add(key)

    def _bare_turn(self) -> bool:
        """Whether this one-record-an-entity batch tries the bare UPDATE (see `bare_skip`)."""
        if self.bare_skip:
            self.bare_skip -= 1
            return False
        return True

    async def _run(
        self,
        rows: list[tuple[Any, ...]],
        timed: bool,
        wired: bool = False,
        several: bool = True,
        bare: bool = False,
    ) -> list[asyncpg.Record] | None:
        """COPY + upsert in one transaction (`timed`: `occurred_at` staged as a timestamptz;
        `wired`: the rows are `_wire_rows`'s, sent as one binary COPY buffer).
        `bare` (one record per entity only): COPY + the bare UPDATE instead, committed only
        when it wrote every staged row (then []), else rolled back whole (then None: nothing
        of the batch stays, and the caller runs the upsert as if this had not been tried).
        Errors are classified, never retried here: a dropped connection (CONNECTION_ERROR) is
        retried by the worker's one retry layer."""
        try:
            conn = await self.pool.acquire(timeout=2.0)
        except Exception as exc:  # refused, or no answer within the connect timeout
            raise _classify(exc, connecting=True) from exc
        try:
            async with conn.transaction():
                if wired:
                    await conn.copy_to_table(
                        _stage(self.table, timed),
                        source=_one(_stage_payload(rows)),
                        columns=[*COLUMNS, "min_rev"],
                        format="binary",
                    )
                else:
                    await conn.copy_records_to_table(
                        _stage(self.table, timed), records=rows, columns=[*COLUMNS, "min_rev"]
                    )
                if bare:
                    if await conn.fetchval(self._bares[timed]) != len(rows):
                        raise _Short  # rolls the transaction back
                    self.bare["written"] += 1
                    self._bare_backoff = _BACKOFF_FIRST
                    return []
                return list(await conn.fetch(self._upserts[timed], len(rows), several))
        except _Short:
            self.bare["short"] += 1
            self.bare_skip = self._bare_backoff
            self._bare_backoff = min(self._bare_backoff * 2, _BACKOFF_MAX)
            return None
        except _ROW_ERRORS:
            raise
        except Exception as exc:
            raise _classify(exc) from exc
        finally:
            await self._release(conn)

    async def _release(self, conn: asyncpg.Connection) -> None:
        """Back to the pool. A connection whose server stopped answering cannot be reset:
        asyncpg terminates it and re-raises (a bare TimeoutError), which must not replace
        the write's own outcome (its SINK_TIMEOUT, or its rows)."""
        with contextlib.suppress(Exception):
            await self.pool.release(conn)

    async def copy_raw(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Plain binary COPY of `row_of` rows into the table: the physical limit for benches."""
        wire = [
            (
                *row[:5],
                None if row[5] is None else _micros(row[5]),
                *(None if v is None else _JSONB + v for v in row[6:8]),
                row[8],
            )
            for row in rows
        ]
        async with self.pool.acquire() as conn:
            await conn.copy_records_to_table(self.table, records=wire, columns=list(COLUMNS))

    async def count(self, live_only: bool = False) -> int:
        """Rows in the table, tombstones included unless `live_only`."""
        rel = f"{self.table}_live" if live_only else self.table
        return int(await self.pool.fetchval(f"SELECT count(*) FROM {rel}"))

    async def fetch(self, tenant: str, entity_type: str, entity_id: str) -> dict[str, Any] | None:
        """The stored row (tombstones included), JSON columns decoded."""
        row = await self.pool.fetchrow(
            f"SELECT * FROM {self.table} WHERE tenant = $1 AND entity_type = $2 AND entity_id = $3",
            tenant,
            entity_type,
            entity_id,
        )
        return None if row is None else dict(row)

    async def health(self) -> dict[str, Any]:
        try:
            await self.pool.fetchval("SELECT 1", timeout=2.0)
        except Exception as exc:
            err = _classify(exc, connecting=True)
            return {"connected": False, "target": self._target, "error": str(err)}
        return {"connected": True, "target": self._target, "table": self.table}

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def _classify(exc: BaseException, connecting: bool = False) -> SinkError:
    """A driver exception as a whole-batch SinkError with its ReasonCode."""
    detail: dict[str, Any] = {"error_class": type(exc).__name__}
    if isinstance(exc, SinkError):
        return exc
    if connecting and isinstance(exc, asyncio.TimeoutError):
        return SinkError(ReasonCode.CONNECTION_ERROR, "connect timed out", **detail)
    if isinstance(exc, asyncpg.QueryCanceledError):
        return SinkError(ReasonCode.SINK_TIMEOUT, str(exc), **detail)
    if isinstance(exc, asyncpg.DeadlockDetectedError | asyncpg.LockNotAvailableError):
        # another writer (two workers copying overlapping new keys in different orders):
        # trying again resolves it, and it says nothing about the server's health
        return SinkError(ReasonCode.SINK_TIMEOUT, str(exc), conflict=True, **detail)
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return SinkError(ReasonCode.RATE_LIMITED, str(exc), **detail)
    if isinstance(exc, asyncio.TimeoutError):
        return SinkError(ReasonCode.SINK_TIMEOUT, "no answer within the client timeout", **detail)
    if isinstance(exc, _CONNECTION_ERRORS):
        return SinkError(ReasonCode.CONNECTION_ERROR, str(exc) or type(exc).__name__, **detail)
    return SinkError(ReasonCode.CONNECTION_ERROR, f"unexpected: {exc}", **detail)
