"""The contract every sink keeps, one suite for all: adding a backend = adding it to SINKS.

Judged only through what the worker sees (`SinkResult`s, `SinkError` reasons), on real
servers. Backends here: SQLite (a file), Postgres and Typesense (`scripts/services/up.sh
postgres typesense`). Neo4j is not in the list yet (its hand-written tests stay). A new sink
joins by one entry in SINKS: a factory for a working sink and one for a sink whose server
cannot be reached. Each test has a tenant of its own: nothing is shared on a shared server.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from ingest.errors import SinkError
from ingest.records import ReasonCode, SinkResult
from ingest.sinks.base import Sink
from ingest.sinks.postgres import PostgresSink
from ingest.sinks.sqlite import SQLiteSink
from ingest.sinks.typesense import TypesenseSink
from tests.integration._fixtures_graph import TS_FIELDS, tenant, typesense_admin, typesense_coords
from tests.integration.conftest import make_record

__all__ = ["tenant", "typesense_coords"]  # pytest fixtures

pytestmark = pytest.mark.integration

Factory = Callable[[Path, Any], Awaitable[Sink]]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _sqlite(tmp: Path, _: Any) -> Sink:
    return SQLiteSink("sqlite", tmp / "sink.db")


async def _sqlite_down(tmp: Path, _: Any) -> Sink:
    (tmp / "not-a-dir").write_text("")  # the sink's file would live under a plain file
    return SQLiteSink("sqlite", tmp / "not-a-dir" / "sink.db")


async def _postgres(tmp: Path, request: Any) -> Sink:
    table = f"contract_{uuid.uuid4().hex[:12]}"  # its own table; dropped afterwards
    dsn = request.getfixturevalue("pg_url")

    async def drop() -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
        finally:
            await conn.close()

    request.addfinalizer(lambda: asyncio.run(drop()))
    return PostgresSink("pg", dsn, table=table)


async def _postgres_down(tmp: Path, _: Any) -> Sink:
    return PostgresSink("pg", f"postgresql://x@127.0.0.1:{_closed_port()}/x", table="entities")


async def _typesense(tmp: Path, request: Any) -> Sink:
    coords = request.getfixturevalue("typesense_coords")
    tenant = request.getfixturevalue("tenant")

    def drop() -> None:
        admin = typesense_admin(coords)
        for coll in admin.collections.retrieve():
            if coll["name"].startswith(tenant):
                admin.collections[coll["name"]].delete()

    request.addfinalizer(drop)
    return TypesenseSink("typesense", fields=TS_FIELDS, **coords)


async def _typesense_down(tmp: Path, _: Any) -> Sink:
    url = f"http://127.0.0.1:{_closed_port()}"
    return TypesenseSink("typesense", url=url, api_key="x", fields=TS_FIELDS)


# name -> (a working sink, a sink whose store cannot be reached)
SINKS: dict[str, tuple[Factory, Factory]] = {
    "sqlite": (_sqlite, _sqlite_down),
    "postgres": (_postgres, _postgres_down),
    "typesense": (_typesense, _typesense_down),
}


@pytest.fixture(params=sorted(SINKS))
async def sink(request: Any, tmp_path: Path, tenant: str) -> AsyncIterator[Sink]:
    _TENANT[0] = tenant  # each test its own tenant: nothing shared on a shared server
    s = await SINKS[request.param][0](tmp_path, request)
    await s.start()
    yield s
    await s.close()


_TENANT = ["acme"]


def rec(entity_id: str, revision: int, **kw: Any) -> Any:
    kw.setdefault("tenant", _TENANT[0])
    return make_record(entity_id, revision, **kw)


def outcomes(results: list[SinkResult]) -> list[str]:
    return [r.reason.value if r.reason else r.status.value for r in results]


async def test_revision_rule_in_batch_order_and_against_the_stored_row(sink: Sink) -> None:
    batch = [rec("o1", 1), rec("o1", 3), rec("o1", 2),
             rec("o2", 5), rec("o1", 3)]  # fmt: skip
    results = await sink.write(batch)
    assert outcomes(results) == ["applied", "applied", "OLDER_REVISION", "applied", "unchanged"]
    assert results[2].detail is not None and results[2].detail["stored_revision"] == 3
    later = [rec("o1", 2), rec("o1", 3), rec("o1", 4),
             rec("o2", 4)]  # fmt: skip
    assert outcomes(await sink.write(later)) == [
        "OLDER_REVISION", "unchanged", "applied", "OLDER_REVISION"
    ]  # fmt: skip


async def test_the_same_id_in_another_tenant_or_type_is_another_entity(sink: Sink) -> None:
    await sink.write([rec("o1", 5)])
    others = [rec("o1", 1, tenant=f"{_TENANT[0]}x"), rec("o1", 1, entity_type="invoice")]
    assert outcomes(await sink.write(others)) == ["applied", "applied"]


async def test_a_tombstone_blocks_older_revisions_and_yields_to_newer(sink: Sink) -> None:
    await sink.write([rec("o1", 3)])
    assert outcomes(await sink.write([rec("o1", 5, deleted=True)])) == ["applied"]
    assert outcomes(await sink.write([rec("o1", 4)])) == ["OLDER_REVISION"]
    assert outcomes(await sink.write([rec("o1", 5, deleted=True)])) == ["unchanged"]
    assert outcomes(await sink.write([rec("o1", 6)])) == ["applied"]


async def test_a_batch_written_again_changes_nothing(sink: Sink) -> None:
    """A batch repeated after a crash (read again, not yet committed) is absorbed."""
    batch = [rec(f"o{i}", 2 + i % 3, deleted=i % 4 == 0) for i in range(20)]
    assert set(outcomes(await sink.write(batch))) == {"applied"}
    assert set(outcomes(await sink.write(batch))) == {"unchanged"}


@pytest.mark.parametrize("name", sorted(SINKS))
async def test_an_unreachable_store_is_a_connection_error(
    name: str, tmp_path: Path, request: Any
) -> None:
    """An outage is the worker's to wait out (breaker, retry): never a per-record failure."""
    s = await SINKS[name][1](tmp_path, request)
    try:
        try:
            await s.start()
        except SinkError as exc:
            assert exc.reason is ReasonCode.CONNECTION_ERROR
            return
        with pytest.raises(SinkError) as info:
            await s.write([rec("o1", 1)])
        assert info.value.reason is ReasonCode.CONNECTION_ERROR
    finally:
        await s.close()
