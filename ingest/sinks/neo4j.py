"""Neo4j sink: each entity is an `:Entity` node, its relations are relationships.

The revision guard runs inside Cypher, in the same transaction as the write: the node is
MERGEd and write-locked (`SET n._lock`) *before* its revision is read, so two writers of one
entity serialize on that lock and the later one sees the earlier one's revision (no lost
update). A tombstone deletes the node with its outgoing relationships and leaves a
`:Tombstone` marker with the revision, which the guard reads too, so a late older revision
cannot resurrect the entity. A node other entities still point to is kept as a bare stub
instead (edges are the *other* entities' state; DETACH DELETE would silently drop them).
For replays (ingest/sinks/base.py), whichever holds the stored revision (node or tombstone)
also keeps `_dedupe_key` (hex) of the record written and `_prev_revision`, the revision
stored before that write; `judge_batch` reads them. Model and reasoning: docs/sinks.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
from neo4j import AsyncDriver, AsyncGraphDatabase
from neo4j.exceptions import (
    AuthError,
    ClientError,
    ConnectionAcquisitionTimeoutError,
    ConstraintError,
    Neo4jError,
    ServiceUnavailable,
    SessionExpired,
    TransientError,
)

from ingest.errors import SinkError
from ingest.records import ReasonCode, Record, SinkResult
from ingest.sinks.base import (
    EntityKey,
    StoredRow,
    judge_batch,
    latest_per_entity,
    write_around_refused,
)

_SCHEMA = (
    "CREATE CONSTRAINT ingest_entity_key IF NOT EXISTS FOR (n:Entity) "
    "REQUIRE (n.tenant, n.entity_type, n.entity_id) IS UNIQUE",
    "CREATE CONSTRAINT ingest_tombstone_key IF NOT EXISTS FOR (n:Tombstone) "
    "REQUIRE (n.tenant, n.entity_type, n.entity_id) IS UNIQUE",
)

# One row per entity (the batch's winner). `stored` is the revision before this write, read
# under the node's write lock, with the dedupe key and previous revision kept by whichever
# (node or tombstone) holds it; `applied` says whether this row was written.
_WRITE = """
UNWIND $rows AS row
MERGE (n:Entity {tenant: row.tenant, entity_type: row.entity_type, entity_id: row.entity_id})
SET n._lock = true
WITH n, row
OPTIONAL MATCH (tomb:Tombstone {tenant: row.tenant, entity_type: row.entity_type,
                                entity_id: row.entity_id})
WITH n, row, tomb, CASE WHEN tomb IS NULL OR n.revision >= tomb.revision
                        THEN n ELSE tomb END AS holder
WITH n, row, tomb, holder.revision AS stored, holder._dedupe_key AS stored_key,
     holder._prev_revision AS stored_prev
WITH n, row, tomb, stored, stored_key, stored_prev,
     (stored IS NULL OR row.revision > stored) AS applied
REMOVE n._lock
WITH n, row, tomb, stored, stored_key, stored_prev, applied
CALL (n, applied) {
  WITH * WHERE NOT applied AND n.revision IS NULL AND NOT EXISTS { (n)--() }
  DELETE n
}
CALL (n, row, tomb, stored, applied) {
  WITH * WHERE applied AND NOT row.deleted
  SET n = row.props
  SET n._dedupe_key = row.dedupe_key, n._prev_revision = stored
  WITH n, row, tomb
  CALL (tomb) { WITH * WHERE tomb IS NOT NULL DELETE tomb }
  CALL (n) { MATCH (n)-[old]->() DELETE old }
  UNWIND row.rels AS rel
  MERGE (m:Entity {tenant: row.tenant, entity_type: rel.target_type, entity_id: rel.target_id})
  MERGE (n)-[:$(rel.type)]->(m)
}
CALL (n, row, stored, applied) {
  WITH * WHERE applied AND row.deleted
  MERGE (t:Tombstone {tenant: row.tenant, entity_type: row.entity_type,
                      entity_id: row.entity_id})
  SET t.revision = row.revision, t.occurred_at = row.occurred_at,
      t._dedupe_key = row.dedupe_key, t._prev_revision = stored
  WITH n, row
  CALL (n) { MATCH (n)-[old]->() DELETE old }
  SET n = {tenant: row.tenant, entity_type: row.entity_type, entity_id: row.entity_id}
  WITH n WHERE NOT EXISTS { ()-->(n) }
  DELETE n
}
RETURN row.tenant AS tenant, row.entity_type AS entity_type, row.entity_id AS entity_id,
       applied, stored, stored_key, stored_prev
"""

# Key, guard and replay fields: set by the sink, never taken from attributes.
_RESERVED = frozenset(
    {
        "tenant",
        "entity_type",
        "entity_id",
        "revision",
        "occurred_at",
        "_dedupe_key",
        "_prev_revision",
    }
)
_ENTITY_GONE = "Neo.ClientError.Statement.EntityNotFound"  # a concurrent tombstone deleted it


class _RowRefused(Exception):
    """The database refused the batch for its content (constraint, type): isolate the row."""

    def __init__(self, cause: Neo4jError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _prop(value: Any) -> Any:
    """Neo4j stores scalars and flat lists only: nested values are kept as JSON text, and
    integers outside int64 (which Bolt cannot carry) as decimal text."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _row(rec: Record) -> dict[str, Any]:
    body = rec.body
    attributes = body.get("attributes") or {}
    props = {k: _prop(v) for k, v in attributes.items() if k not in _RESERVED}
    props.update(  # the key and guard fields win over attributes of the same name
        tenant=rec.tenant,
        entity_type=rec.entity_type,
        entity_id=rec.entity_id,
        revision=rec.revision,
        occurred_at=_prop(body.get("occurred_at")),
    )
    rels = [
        {
            "type": str(r["type"]),
            "target_type": str(r["target_type"]),
            "target_id": str(r["target_id"]),
        }
        for r in body.get("relations") or ()
    ]
    return {
        "tenant": rec.tenant,
        "entity_type": rec.entity_type,
        "entity_id": rec.entity_id,
        "revision": rec.revision,
        "occurred_at": props["occurred_at"],
        "deleted": rec.deleted,
        "dedupe_key": rec.dedupe_key.hex(),
        "props": props,
        "rels": rels,
    }


def _key_bytes(value: Any) -> bytes | None:
    """A stored `_dedupe_key` back to bytes; None when absent (written before replay
    support) or not one of ours."""
    if not isinstance(value, str):
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _conflict(exc: Exception) -> bool:
    """A failure caused by another writer, not by the server or the data: a deadlock, a lock
    wait, a MERGE race on the unique key, an entity a concurrent tombstone removed. Trying
    again resolves it; it says nothing about the sink's health."""
    if isinstance(exc, ConstraintError):  # on our own key only: a user's constraint is data
        return "`entity_id`" in (exc.message or "")
    if isinstance(exc, TransientError):
        return any(word in (exc.code or "") for word in ("Deadlock", "Lock"))
    return isinstance(exc, ClientError) and exc.code == _ENTITY_GONE


def _classify(exc: Exception, target: str) -> Exception:
    """Translate a driver error once (never retried here: the worker's retry layer does);
    `_RowRefused` means this row's data was refused."""
    name = type(exc).__name__
    where = f"neo4j at {target}: {exc}"
    if _conflict(exc):
        return SinkError(ReasonCode.SINK_TIMEOUT, where, conflict=True, error_class=name)
    # Before OSError, of which TimeoutError is a subclass: no answer in time is a timeout.
    if isinstance(exc, TransientError | ConnectionAcquisitionTimeoutError | TimeoutError):
        return SinkError(ReasonCode.SINK_TIMEOUT, where, error_class=name)
    if isinstance(exc, ServiceUnavailable | SessionExpired | AuthError | OSError):
        return SinkError(ReasonCode.CONNECTION_ERROR, where, error_class=name)
    if isinstance(exc, ClientError) and "TransactionTimedOut" in (exc.code or ""):
        return SinkError(ReasonCode.SINK_TIMEOUT, where, error_class=name)
    if isinstance(exc, ClientError):
        return _RowRefused(exc)
    return SinkError(ReasonCode.CONNECTION_ERROR, where, error_class=name)


class Neo4jSink:
    """Guarded, batched upserts of entities and their relations into Neo4j."""

    kind = "neo4j"

    def __init__(
        self,
        name: str,
        uri: str,
        user: str,
        password: str,
        database: str | None = None,
        *,
        timeout_seconds: float = 30.0,
    ) -> None:
        self.name = name
        self._uri = uri
        self._database = database
        self._timeout = timeout_seconds
        self._driver: AsyncDriver = AsyncGraphDatabase.driver(
            uri,
            auth=(user, password),
            connection_timeout=5.0,
            connection_acquisition_timeout=timeout_seconds,
        )

    async def start(self) -> None:
        for statement in _SCHEMA:
            await self._run_write(statement, {})

    async def close(self) -> None:
        await self._driver.close()

    async def health(self) -> dict[str, Any]:
        try:
            await self._driver.verify_connectivity()
        except Exception as exc:  # health reports, never raises
            return {"connected": False, "target": self._uri, "error": str(exc)}
        return {"connected": True, "target": self._uri}

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        """A refused row fails alone (sinks/base.py `write_around_refused`)."""
        if not records:
            return []
        return await write_around_refused(records, self._write_once)

    async def _write_once(
        self, records: Sequence[Record]
    ) -> tuple[list[SinkResult], dict[EntityKey, SinkResult]]:
        winners = sorted(latest_per_entity(records), key=lambda r: r.entity_key)  # lock order
        try:
            rows = await self._run_write(_WRITE, {"rows": [_row(r) for r in winners]})
        except _RowRefused:
            return await self._write_isolated(records, winners)
        return self._judge(records, rows), {}

    async def _write_isolated(
        self, records: Sequence[Record], winners: list[Record]
    ) -> tuple[list[SinkResult], dict[EntityKey, SinkResult]]:
        """One transaction per entity, so one refused row does not fail its neighbours."""
        rows: list[dict[str, Any]] = []
        refused: dict[EntityKey, SinkResult] = {}
        for rec in winners:
            try:
                rows += await self._run_write(_WRITE, {"rows": [_row(rec)]})
            except _RowRefused as exc:
                refused[rec.entity_key] = SinkResult.failed(
                    ReasonCode.CONSTRAINT_VIOLATION,
                    error_class=type(exc.cause).__name__,
                    code=exc.cause.code,
                    message=exc.cause.message or str(exc.cause),
                )
        return self._judge(records, rows), refused

    @staticmethod
    def _judge(records: Sequence[Record], rows: list[dict[str, Any]]) -> list[SinkResult]:
        stored: dict[EntityKey, StoredRow] = {}
        written: set[EntityKey] = set()
        for row in rows:
            key = (row["tenant"], row["entity_type"], row["entity_id"])
            if row["stored"] is not None:
                stored[key] = (
                    row["stored"],
                    _key_bytes(row["stored_key"]),
                    _int(row["stored_prev"]),
                )
            if row["applied"]:
                written.add(key)
        return judge_batch(records, stored, written)

    async def _run_write(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run in one write transaction; a failure is classified, never retried here."""
        try:
            return await asyncio.wait_for(self._tx(query, params), self._timeout + 5.0)
        except (Neo4jError, ServiceUnavailable, SessionExpired) as exc:
            raise _classify(exc, self._uri) from exc
        except (ConnectionAcquisitionTimeoutError, TimeoutError, OSError) as exc:
            raise _classify(exc, self._uri) from exc

    async def _tx(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self._driver.session(database=self._database) as session:
            tx = await session.begin_transaction(timeout=self._timeout)
            try:
                result = await tx.run(query, params)
                data = await result.data()
                await tx.commit()
            finally:
                if not tx.closed():
                    await tx.rollback()
            return data

    async def _read(self, query: str, **params: Any) -> list[dict[str, Any]]:
        records, _, _ = await self._driver.execute_query(
            query, params, database_=self._database, routing_="r"
        )
        return [r.data() for r in records]

    async def count_nodes(self, tenant: str | None = None) -> int:
        """Entities written by this sink (nodes with a revision; relation stubs not counted)."""
        rows = await self._read(
            "MATCH (n:Entity) WHERE n.revision IS NOT NULL AND ($t IS NULL OR n.tenant = $t) "
            "RETURN count(n) AS c",
            t=tenant,
        )
        return int(rows[0]["c"])

    async def fetch(self, tenant: str, entity_type: str, entity_id: str) -> dict[str, Any] | None:
        """Node properties plus `relationships` [{type, target_type, target_id}], for tests."""
        rows = await self._read(
            "MATCH (n:Entity {tenant: $t, entity_type: $et, entity_id: $id}) "
            "OPTIONAL MATCH (n)-[r]->(m:Entity) "
            "RETURN properties(n) AS props, collect(CASE WHEN r IS NULL THEN NULL ELSE "
            "{type: type(r), target_type: m.entity_type, target_id: m.entity_id} END) AS rels",
            t=tenant,
            et=entity_type,
            id=entity_id,
        )
        if not rows:
            return None
        rels = sorted(rows[0]["rels"], key=lambda r: (r["type"], r["target_type"], r["target_id"]))
        return {**rows[0]["props"], "relationships": rels}

    async def tombstone_revision(self, tenant: str, entity_type: str, entity_id: str) -> int | None:
        """Revision of the `:Tombstone` marker left by a delete, if any."""
        rows = await self._read(
            "MATCH (t:Tombstone {tenant: $t, entity_type: $et, entity_id: $id}) "
            "RETURN t.revision AS r",
            t=tenant,
            et=entity_type,
            id=entity_id,
        )
        return int(rows[0]["r"]) if rows else None
