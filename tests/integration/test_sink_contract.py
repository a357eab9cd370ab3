"""The contract every sink keeps, one suite for all: adding a backend = adding it to SINKS.

Judged only through what the worker sees (`SinkResult`s, `SinkError` reasons, `health()`, and
for the per-row and replay cases the worker's own counts and DLQ entries), on real servers.
Backends: SQLite (a file), Postgres, Typesense and Neo4j (`scripts/services/up.sh postgres
typesense neo4j`). A new sink joins by one `Backend` entry in SINKS: a factory for a working
sink (optionally through a proxy, with a short timeout), one for a sink whose server cannot be
reached, a way to make its store refuse a row, and one to make it stop answering. Each test
has a tenant of its own: nothing is shared on a shared server. A case that cannot apply to a
backend is listed in NOT_APPLICABLE with the reason, reported as a skip that says so
(`pytest -rs`): only the mid-run outage, for SQLite.

Cases: the revision rule (in batch order, against the stored row); tenant and type are part
of the key; tombstones; a batch written again after a crash (one record per entity, and
several, judged like its first pass); replays as `replayctl run` makes them (the worker's
`check_duplicates=False`: claimed records reach the sink again, what it holds is a duplicate,
what it never got is applied, nothing is rolled back); per-row failures (a row the store
refuses fails alone with CONSTRAINT_VIOLATION, its entity judged as if it were not in the
batch, and the worker DLQs exactly those rows); outages (an unreachable store, and one that
goes away under a started sink, are CONNECTION_ERROR; one that stops answering is
SINK_TIMEOUT within a bound, never a hang; never a per-record failure; the same instance
writes again once the store is back). What only one backend has (its storage layout, its own
server errors, concurrent writers) stays in that backend's test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import pytest
from neo4j import GraphDatabase

from ingest.config import TypesenseField, parse_config
from ingest.errors import SinkError
from ingest.metrics import Metrics
from ingest.pipeline.admission import Admission
from ingest.pipeline.breaker import CircuitBreaker
from ingest.pipeline.retry import RetryPolicy
from ingest.pipeline.worker import BatchReport, Pipeline, SinkLane
from ingest.records import ReasonCode, Record, SinkResult
from ingest.sinks.base import Sink
from ingest.sinks.neo4j import Neo4jSink
from ingest.sinks.postgres import PostgresSink
from ingest.sinks.sqlite import SQLiteSink
from ingest.sinks.typesense import TypesenseSink
from ingest.state.sqlite import SQLiteDB, SQLiteDLQStore, SQLiteDroppedStore
from ingest.state.sqlite_idem import SQLiteIdempotencyStore
from tests.integration._fixtures_graph import typesense_admin
from tests.integration.conftest import make_record

pytestmark = pytest.mark.integration

Via = Callable[[str, int], tuple[str, int]]  # the server's address -> the one to connect to
Down = Callable[[Path, Any], Awaitable[Sink]]
Refusal = Callable[[Sink, Any], Awaitable[dict[str, Any]]]
Stall = Callable[[Sink, "Proxy"], AbstractAsyncContextManager[None]]


class Factory(Protocol):
    def __call__(
        self, tmp: Path, request: Any, *, via: Via | None = None, timeout: float | None = None
    ) -> Awaitable[Sink]: ...


@dataclass(frozen=True)
class Backend:
    # A working sink (connecting through `via` and giving up after about `timeout` seconds,
    # when given); what it writes is removed after the test.
    make: Factory
    down: Down  # a sink whose store cannot be reached
    # Makes the store refuse a value (naturally where it has one, else an operator's
    # constraint) and returns attributes carrying it.
    refuse: Refusal
    # While entered, the store stops answering the sink (made with `via=proxy.via`).
    stall: Stall


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _through(url: str, via: Via | None) -> str:
    """`url` with its host and port replaced by `via`'s (the outage proxy's)."""
    if via is None:
        return url
    parts = urlsplit(url)
    host, port = via(parts.hostname or "127.0.0.1", parts.port or 0)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}:{port}" if user else f"{host}:{port}"))


# -- SQLite ---------------------------------------------------------------------------------


async def _sqlite(
    tmp: Path, _: Any, *, via: Via | None = None, timeout: float | None = None
) -> Sink:
    """No connection to route through `via`; the busy timeout is set by `_sqlite_locked`."""
    return SQLiteSink("sqlite", tmp / "sink.db")


async def _sqlite_down(tmp: Path, _: Any) -> Sink:
    (tmp / "not-a-dir").write_text("")  # the sink's file would live under a plain file
    return SQLiteSink("sqlite", tmp / "not-a-dir" / "sink.db")


async def _sqlite_refuses(sink: Sink, _: Any) -> dict[str, Any]:
    """SQLite stores any JSON: an operator's trigger is the refusal here."""
    db = cast(SQLiteSink, sink).db
    for event in ("INSERT", "UPDATE"):
        sql = (
            f"CREATE TRIGGER refuse_{event.lower()} BEFORE {event} ON entities"
            " WHEN json_extract(NEW.attributes, '$.embargoed') IS NOT NULL"
            " BEGIN SELECT RAISE(ABORT, 'embargoed rows are refused'); END"
        )
        await db.run(lambda c, sql=sql: c.execute(sql))
    return {"embargoed": True}


@contextlib.asynccontextmanager
async def _sqlite_locked(sink: Sink, _: Proxy) -> AsyncIterator[None]:
    """Another process holds the file's write lock (longer than the sink's busy timeout)."""
    db = cast(SQLiteSink, sink).db
    await db.run(lambda c: c.execute("PRAGMA busy_timeout = 500"))
    other = sqlite3.connect(cast(SQLiteSink, sink).path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


@contextlib.asynccontextmanager
async def _frozen(sink: Sink, proxy: Proxy) -> AsyncIterator[None]:
    """The server (behind the proxy) stops answering; connections stay open."""
    proxy.freeze()
    try:
        yield
    finally:
        proxy.thaw()


# -- Postgres -------------------------------------------------------------------------------


async def _postgres(
    tmp: Path, request: Any, *, via: Via | None = None, timeout: float | None = None
) -> Sink:
    table = f"contract_{uuid.uuid4().hex[:12]}"  # its own table; dropped afterwards
    dsn = request.getfixturevalue("pg_url")

    async def drop() -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
        finally:
            await conn.close()

    request.addfinalizer(lambda: asyncio.run(drop()))
    ms = 30000 if timeout is None else int(timeout * 1000)
    return PostgresSink("pg", _through(dsn, via), table=table, statement_timeout_ms=ms)


async def _postgres_down(tmp: Path, _: Any) -> Sink:
    return PostgresSink("pg", f"postgresql://x@127.0.0.1:{_closed_port()}/x", table="entities")


async def _postgres_refuses(sink: Sink, _: Any) -> dict[str, Any]:
    """jsonb cannot hold a NUL character (untranslatable_character)."""
    return {"note": "a NUL \x00 here"}


# -- Typesense ------------------------------------------------------------------------------

# `amount` is declared, so a document whose amount is not a number is refused.
_TS_FIELDS = {"order": [TypesenseField(name="amount", type="int64", optional=True)]}


async def _typesense(
    tmp: Path, request: Any, *, via: Via | None = None, timeout: float | None = None
) -> Sink:
    coords = request.getfixturevalue("typesense_coords")
    tenant = request.getfixturevalue("tenant")

    def drop() -> None:
        admin = typesense_admin(coords)
        for coll in admin.collections.retrieve():
            if coll["name"].startswith(tenant):
                admin.collections[coll["name"]].delete()

    request.addfinalizer(drop)
    url = _through(coords["url"], via)
    return TypesenseSink(
        "typesense", url, coords["api_key"], fields=_TS_FIELDS, timeout_seconds=timeout or 10.0
    )


async def _typesense_down(tmp: Path, _: Any) -> Sink:
    url = f"http://127.0.0.1:{_closed_port()}"
    return TypesenseSink("typesense", url=url, api_key="x", fields=_TS_FIELDS)


async def _typesense_refuses(sink: Sink, _: Any) -> dict[str, Any]:
    return {"amount": "not a number"}


# -- Neo4j ----------------------------------------------------------------------------------


def _neo4j_run(coords: dict[str, str], query: str, **params: Any) -> None:
    """An independent (synchronous) driver, for setup and cleanup outside the test's loop."""
    with GraphDatabase.driver(coords["uri"], auth=(coords["user"], coords["password"])) as d:
        d.execute_query(query, params)


async def _neo4j(
    tmp: Path, request: Any, *, via: Via | None = None, timeout: float | None = None
) -> Sink:
    coords = request.getfixturevalue("neo4j_coords")
    tenant = request.getfixturevalue("tenant")
    request.addfinalizer(
        lambda: _neo4j_run(
            coords,
            "MATCH (n) WHERE (n:Entity OR n:Tombstone) AND n.tenant STARTS WITH $t"
            " DETACH DELETE n",
            t=tenant,
        )
    )
    uri = _through(coords["uri"], via)
    return Neo4jSink(
        "neo4j", uri, coords["user"], coords["password"], timeout_seconds=timeout or 30.0
    )


async def _neo4j_down(tmp: Path, _: Any) -> Sink:
    return Neo4jSink("neo4j", f"bolt://127.0.0.1:{_closed_port()}", "neo4j", "x")


async def _neo4j_refuses(sink: Sink, request: Any) -> dict[str, Any]:
    """Community Neo4j has no property type constraints: an operator's uniqueness
    constraint, and a node of another tenant already holding the value."""
    coords = request.getfixturevalue("neo4j_coords")
    tenant = request.getfixturevalue("tenant")
    prop = f"badge_{uuid.uuid4().hex[:8]}"
    _neo4j_run(coords, f"CREATE CONSTRAINT {prop} FOR (n:Entity) REQUIRE n.{prop} IS UNIQUE")
    request.addfinalizer(lambda: _neo4j_run(coords, f"DROP CONSTRAINT {prop}"))
    _neo4j_run(
        coords,
        f"CREATE (:Entity {{tenant: $t, entity_type: 'holder', entity_id: 'h', {prop}: 'taken'}})",
        t=f"{tenant}-holder",
    )
    return {prop: "taken"}


# name -> its factories
SINKS: dict[str, Backend] = {
    "sqlite": Backend(_sqlite, _sqlite_down, _sqlite_refuses, _sqlite_locked),
    "postgres": Backend(_postgres, _postgres_down, _postgres_refuses, _frozen),
    "typesense": Backend(_typesense, _typesense_down, _typesense_refuses, _frozen),
    "neo4j": Backend(_neo4j, _neo4j_down, _neo4j_refuses, _frozen),
}
# (test name, backend) -> why the case cannot apply to that backend. Shown as a skip with
# its reason (`pytest -rs`), never a silent pass.
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    ("test_an_outage_mid_run_is_a_connection_error_and_the_same_sink_recovers", "sqlite"): (
        "an embedded file has no server or connection that can go away; its outages are the"
        " unusable path (unreachable-store case) and the locked file (stops-answering case)"
    ),
}


def _backends(test: str) -> list[Any]:
    return [
        pytest.param(
            name,
            marks=[pytest.mark.skip(reason=f"not applicable to {name}: {why}")]
            if (why := NOT_APPLICABLE.get((test, name)))
            else [],
        )
        for name in sorted(SINKS)
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _backends(metafunc.function.__name__))


@pytest.fixture
async def sink(backend: str, request: Any, tmp_path: Path, tenant: str) -> AsyncIterator[Sink]:
    _TENANT[0] = tenant  # each test its own tenant: nothing shared on a shared server
    s = await SINKS[backend].make(tmp_path, request)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def pipeline(sink: Sink, tmp_path: Path) -> AsyncIterator[Pipeline]:
    """The worker's batch path with this sink as its one lane (state in a SQLite file)."""
    db = await SQLiteDB.open(tmp_path / "state.db")
    config = parse_config({"sinks": [{"type": "sqlite", "name": sink.name}]})
    yield Pipeline(
        config=config,
        admission=Admission(config.admission, config.limits_for),
        idempotency=SQLiteIdempotencyStore(db),
        dlq=SQLiteDLQStore(db),
        dropped=SQLiteDroppedStore(db),
        lanes={sink.name: SinkLane(sink, CircuitBreaker(sink.name), started=True)},
        metrics=Metrics(),
        retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_total=1),
    )
    await db.close()


_TENANT = ["acme"]


def rec(entity_id: str, revision: int, **kw: Any) -> Record:
    kw.setdefault("tenant", _TENANT[0])
    return make_record(entity_id, revision, **kw)


def outcomes(results: list[SinkResult]) -> list[str]:
    return [r.reason.value if r.reason else r.status.value for r in results]


async def deliver(pipe: Pipeline, records: list[Record], *, replay: bool = False) -> BatchReport:
    """As a source's batch; `replay` as `replayctl run` delivers (no idempotency check)."""
    raws = [r.raw for r in records]
    return await pipe.deliver(raws, records, check_duplicates=not replay)


def counts(report: BatchReport) -> tuple[int, int, int]:
    return report.delivered, report.duplicate, report.dlq


# -- the revision rule and tombstones ---------------------------------------------------------


async def test_revision_rule_in_batch_order_and_against_the_stored_row(sink: Sink) -> None:
    batch = [rec("o1", 1), rec("o1", 3), rec("o1", 2),
             rec("o2", 5), rec("o1", 3)]  # fmt: skip
    results = await sink.write(batch)
    assert outcomes(results) == ["applied", "applied", "OLDER_REVISION", "applied", "unchanged"]
    assert results[2].detail is not None and results[2].detail["stored_revision"] == 3
    # Not copies of the stored records: beside older ones, that is a replay (below).
    later = [rec("o1", 2), rec("o1", 3, attributes={"v": 2}), rec("o1", 4),
             rec("o2", 4)]  # fmt: skip
    results = await sink.write(later)
    assert outcomes(results) == ["OLDER_REVISION", "unchanged", "applied", "OLDER_REVISION"]
    assert results[0].detail is not None and results[0].detail["stored_revision"] == 3
    assert results[0].detail["incoming_revision"] == 2
    assert results[3].detail is not None and results[3].detail["stored_revision"] == 5


async def test_the_same_id_in_another_tenant_or_type_is_another_entity(sink: Sink) -> None:
    await sink.write([rec("o1", 5)])
    others = [rec("o1", 1, tenant=f"{_TENANT[0]}x"), rec("o1", 1, entity_type="invoice")]
    assert outcomes(await sink.write(others)) == ["applied", "applied"]


async def test_a_tombstone_blocks_older_revisions_and_yields_to_newer(sink: Sink) -> None:
    await sink.write([rec("o1", 3)])
    assert outcomes(await sink.write([rec("o1", 5, deleted=True)])) == ["applied"]
    assert outcomes(await sink.write([rec("o1", 4)])) == ["OLDER_REVISION"]
    assert outcomes(await sink.write([rec("o1", 5, deleted=True)])) == ["unchanged"]
    # Deleted in the same batch it was created in, then an older revision arrives late.
    both = [rec("o2", 1), rec("o2", 2, deleted=True)]
    assert outcomes(await sink.write(both)) == ["applied", "applied"]
    assert outcomes(await sink.write([rec("o2", 1, attributes={"v": 0})])) == ["OLDER_REVISION"]
    assert outcomes(await sink.write([rec("o1", 6)])) == ["applied"]


# -- batches written again, and replays --------------------------------------------------------


async def test_a_batch_written_again_changes_nothing(sink: Sink) -> None:
    """A batch repeated after a crash (read again, not yet committed) is absorbed."""
    batch = [rec(f"o{i}", 2 + i % 3, deleted=i % 4 == 0) for i in range(20)]
    assert set(outcomes(await sink.write(batch))) == {"applied"}
    assert set(outcomes(await sink.write(batch))) == {"unchanged"}


async def test_a_batch_written_again_is_judged_like_its_first_pass(sink: Sink) -> None:
    """A crash between the sink write and the idempotency claim writes the batch again: the
    records its winners superseded must not turn into OLDER_REVISION the second time."""
    await sink.write([rec("o3", 1)])
    batch = [rec("o1", 2), rec("o1", 7), rec("o1", 3),
             rec("o2", 4), rec("o2", 6, deleted=True), rec("o2", 5),
             rec("o3", 2), rec("o3", 1), rec("o3", 3)]  # fmt: skip
    first = ["applied", "applied", "OLDER_REVISION",
             "applied", "applied", "OLDER_REVISION",
             "applied", "OLDER_REVISION", "applied"]  # fmt: skip
    assert outcomes(await sink.write(batch)) == first
    again = first.copy()
    again[1] = again[4] = again[8] = "unchanged"  # each entity's winner is stored already
    assert outcomes(await sink.write(batch)) == again
    assert outcomes(await sink.write(batch)) == again  # and a third time
    # One record alone, repeated: an equal revision, UNCHANGED.
    assert outcomes(await sink.write([rec("o1", 7)])) == ["unchanged"]
    # A later batch with other records is judged against what is stored, not as a replay.
    results = await sink.write([rec("o1", 6), rec("o1", 9), rec("o2", 5), rec("o3", 2)])
    assert outcomes(results) == ["OLDER_REVISION", "applied", "OLDER_REVISION", "OLDER_REVISION"]
    assert results[0].detail is not None and results[0].detail["stored_revision"] == 7
    assert results[2].detail is not None and results[2].detail["stored_revision"] == 6


async def test_a_replay_reapplies_what_the_sink_never_got_and_rolls_nothing_back(
    sink: Sink, pipeline: Pipeline
) -> None:
    """docs/replay.md: `replayctl run` delivers with `check_duplicates=False`, so records
    claimed before (delivered, or sent to the DLQ while the sink was down) reach the sink
    again; the revision guard makes what it holds a duplicate and applies what it lacks."""
    held = [rec("o1", 1), rec("o2", 1)]
    assert counts(await deliver(pipeline, held)) == (2, 0, 0)
    lost = [rec("o3", 1), rec("o1", 2)]  # claimed, never written: as after a DLQ
    await pipeline.idempotency.claim([r.dedupe_key for r in lost])
    window = [*held, *lost]
    assert counts(await deliver(pipeline, window)) == (0, 4, 0)  # the live path: all seen

    report = await deliver(pipeline, window, replay=True)
    assert counts(report) == (2, 2, 0)
    assert outcomes(report.sink_results[sink.name][1]) == [
        "unchanged", "unchanged", "applied", "applied"
    ]  # fmt: skip
    again = await deliver(pipeline, window, replay=True)  # a killed replay repeats a batch
    assert counts(again) == (0, 4, 0)

    # A window older than what is stored is refused, never applied: the DLQ says why.
    older = await deliver(pipeline, [rec("o1", 1, attributes={"v": 0})], replay=True)
    assert counts(older) == (0, 0, 1)
    assert [(e.reason, e.sink, e.revision) for e in older.dlq_entries] == [
        (ReasonCode.OLDER_REVISION, sink.name, 1)
    ]
    assert outcomes(await sink.write([rec("o1", 2, attributes={"v": 0})])) == ["unchanged"]


# -- per-row failures ---------------------------------------------------------------------------


async def test_a_refused_row_fails_alone_and_its_entity_is_judged_without_it(
    sink: Sink, backend: str, request: Any
) -> None:
    """Only what the sink writes can be refused: each entity's newest record. A refused value
    in a record the batch supersedes, or one older than stored, is judged by the revision
    rule alone, whatever else in the batch was refused."""
    bad = await SINKS[backend].refuse(sink, request)
    await sink.write([rec("o4", 2), rec("o7", 2)])
    batch = [rec("o1", 1), rec("o2", 1, attributes=bad),
             rec("o3", 1), rec("o3", 2, attributes=bad),
             rec("o4", 3, attributes=bad), rec("o4", 1),
             rec("o5", 2, attributes=bad), rec("o5", 1),
             rec("o6", 1, attributes=bad), rec("o6", 2),
             rec("o7", 1, attributes=bad)]  # fmt: skip
    results = await sink.write(batch)
    assert outcomes(results) == ["applied", "CONSTRAINT_VIOLATION",
                                 "applied", "CONSTRAINT_VIOLATION",
                                 "CONSTRAINT_VIOLATION", "OLDER_REVISION",
                                 "CONSTRAINT_VIOLATION", "applied",
                                 "applied", "applied",
                                 "OLDER_REVISION"]  # fmt: skip
    for i in (1, 3, 4, 6):
        assert results[i].detail is not None and results[i].detail["message"], results[i]
    assert results[5].detail is not None and results[5].detail["stored_revision"] == 2
    # Nothing of the refused rows was stored: their entities hold what the rest left.
    after = [rec("o1", 1), rec("o2", 1), rec("o3", 1), rec("o4", 2), rec("o5", 1), rec("o6", 2)]
    assert outcomes(await sink.write(after)) == ["unchanged", "applied", "unchanged",
                                                 "unchanged", "unchanged", "unchanged"]  # fmt: skip


async def test_the_worker_dead_letters_only_the_refused_rows(
    sink: Sink, backend: str, request: Any, pipeline: Pipeline
) -> None:
    bad = await SINKS[backend].refuse(sink, request)
    batch = [rec(f"o{i}", 1, attributes=bad if i % 3 == 1 else None) for i in range(9)]
    report = await deliver(pipeline, batch)
    assert counts(report) == (6, 0, 3)
    got = sorted((e.entity_id, e.reason, e.sink, e.attempts) for e in report.dlq_entries)
    assert got == [(f"o{i}", ReasonCode.CONSTRAINT_VIOLATION, sink.name, 1) for i in (1, 4, 7)]
    assert all(e.detail["message"] for e in report.dlq_entries)
    assert counts(await deliver(pipeline, batch)) == (0, 9, 0)  # settled: claimed, not retried


# -- outages ---------------------------------------------------------------------------------


async def test_an_unreachable_store_is_a_connection_error(
    backend: str, tmp_path: Path, request: Any
) -> None:
    """An outage is the worker's to wait out (breaker, retry): never a per-record failure."""
    s = await SINKS[backend].down(tmp_path, request)
    try:
        with pytest.raises(SinkError) as info:
            await s.start()  # a sink may find out here already,
            await s.write([rec("o1", 1)])  # or at its first write
        assert info.value.reason is ReasonCode.CONNECTION_ERROR
        assert (await s.health())["connected"] is False
    finally:
        await s.close()


class Proxy:
    """A TCP forwarder in front of the real server: `down()` drops every connection through it
    and refuses new ones (the server is gone, for the sink), `up()` listens again on the same
    port; `freeze()` holds every byte (the server stops answering), `thaw()` lets them go.
    A network fault, not a mock: the bytes are the server's."""

    def __init__(self) -> None:
        self.target = ("127.0.0.1", 0)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()
        self.flowing = asyncio.Event()
        self.flowing.set()

    def via(self, host: str, port: int) -> tuple[str, int]:
        self.target = (host, port)
        return "127.0.0.1", self.port

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in self.open:
            writer.transport.abort()
        self.open.clear()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.open |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:  # one side ended: end the other, as a cut cable would
                writer.transport.abort()
                up_writer.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.open -= {writer, up_writer}


async def test_an_outage_mid_run_is_a_connection_error_and_the_same_sink_recovers(
    backend: str, tmp_path: Path, request: Any, tenant: str
) -> None:
    """The server goes away under a started sink (every connection dropped, new ones refused)
    and comes back: CONNECTION_ERROR meanwhile, then the same instance writes again within
    the worker's retries, and what was stored before still holds."""
    _TENANT[0] = tenant
    proxy = Proxy()
    await proxy.up()
    s = await SINKS[backend].make(tmp_path, request, via=proxy.via)
    try:
        await s.start()
        assert outcomes(await s.write([rec("o1", 1)])) == ["applied"]
        await proxy.down()
        with pytest.raises(SinkError) as info:
            await s.write([rec("o1", 2)])
        assert info.value.reason is ReasonCode.CONNECTION_ERROR
        assert (await s.health())["connected"] is False
        await proxy.up()
        results, attempts = await _written(s, [rec("o1", 2), rec("o2", 1)])
        assert outcomes(results) == ["applied", "applied"] and attempts <= 2
        assert outcomes(await s.write([rec("o1", 1, attributes={"v": 0})])) == ["OLDER_REVISION"]
    finally:
        await s.close()
        await proxy.down()


async def _written(s: Sink, batch: list[Record]) -> tuple[list[SinkResult], int]:
    """`batch` written as the worker would: a CONNECTION_ERROR is tried again (a pool may
    hand out one connection that died in the outage); returns the results and attempts."""
    for attempt in range(1, 4):
        try:
            return await s.write(batch), attempt
        except SinkError as exc:
            if exc.reason is not ReasonCode.CONNECTION_ERROR or attempt == 3:
                raise
            await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


async def test_a_store_that_stops_answering_is_a_sink_timeout_and_the_sink_recovers(
    backend: str, tmp_path: Path, request: Any, tenant: str
) -> None:
    """A server that holds the connection but does not answer (or a file locked by another
    process) is SINK_TIMEOUT within a bound set by the sink's timeout: never a hang, never
    a per-record failure; when it answers again the same instance writes."""
    _TENANT[0] = tenant
    proxy = Proxy()
    await proxy.up()
    s = await SINKS[backend].make(tmp_path, request, via=proxy.via, timeout=0.5)
    try:
        await s.start()
        assert outcomes(await s.write([rec("o1", 1)])) == ["applied"]
        async with SINKS[backend].stall(s, proxy):
            t0 = time.monotonic()
            with pytest.raises(SinkError) as info:
                await asyncio.wait_for(s.write([rec("o1", 2)]), 60)
            took = time.monotonic() - t0
        assert info.value.reason is ReasonCode.SINK_TIMEOUT, info.value
        assert took < 20  # Postgres: its 10 s client backstop past statement_timeout
        results, _ = await _written(s, [rec("o1", 2)])
        assert outcomes(results) == ["applied"]
    finally:
        await s.close()
        await proxy.down()
