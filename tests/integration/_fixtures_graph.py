"""Fixtures for the Neo4j and Typesense sink tests: real servers from scripts/services.

Each test gets its own tenant id, so tests never see each other's data and cleanup is by
tenant. Its fixtures are registered for the folder by tests/integration/conftest.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import pytest
import pytest_asyncio
import typesense
from neo4j import AsyncDriver, AsyncGraphDatabase

from ingest.config import TypesenseField
from ingest.records import Record
from ingest.sinks.neo4j import Neo4jSink
from ingest.sinks.typesense import TypesenseSink
from tests.conftest import require_env

TS_FIELDS: dict[str, list[TypesenseField]] = {
    "customer": [
        TypesenseField(name="name", type="string"),
        TypesenseField(name="city", type="string", facet=True),
        TypesenseField(name="score", type="int64"),
    ]
}


def make_record(
    tenant: str,
    entity_type: str,
    entity_id: str,
    revision: int,
    attributes: Mapping[str, Any] | None = None,
    relations: Iterable[tuple[str, str, str]] = (),
    deleted: bool = False,
    seq: int = 0,
) -> Record:
    """`tests.integration.conftest.make_record` in the argument order of the graph tests."""
    from tests.integration.conftest import make_record as record  # conftest imports this module

    return record(
        entity_id,
        revision,
        tenant=tenant,
        entity_type=entity_type,
        occurred_at=f"2025-01-01T00:00:{revision % 60:02d}Z",
        priority="normal",
        attributes=dict(attributes or {}),
        relations=relations,
        deleted=deleted,
        source="s",
        seq=seq,
    )


@pytest.fixture(name="tenant")
def fresh_tenant() -> str:
    """A tenant id of the test's own (fixture `tenant`)."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def neo4j_coords() -> dict[str, str]:
    return {
        "uri": require_env("INGEST_TEST_NEO4J_URI", "neo4j"),
        "user": require_env("INGEST_TEST_NEO4J_USER", "neo4j"),
        "password": require_env("INGEST_TEST_NEO4J_PASSWORD", "neo4j"),
    }


@pytest_asyncio.fixture
async def neo4j_driver(neo4j_coords: dict[str, str], tenant: str) -> AsyncIterator[AsyncDriver]:
    """An independent driver for checks; cleans the test's tenant up afterwards."""
    driver = AsyncGraphDatabase.driver(
        neo4j_coords["uri"], auth=(neo4j_coords["user"], neo4j_coords["password"])
    )
    yield driver
    await driver.execute_query(
        "MATCH (n) WHERE (n:Entity OR n:Tombstone) AND n.tenant = $t DETACH DELETE n", t=tenant
    )
    await driver.close()


@pytest_asyncio.fixture
async def neo4j_sink(
    neo4j_coords: dict[str, str], neo4j_driver: AsyncDriver
) -> AsyncIterator[Neo4jSink]:
    sink = Neo4jSink("neo4j-test", **neo4j_coords)
    await sink.start()
    yield sink
    await sink.close()


@pytest.fixture
def typesense_coords() -> dict[str, str]:
    return {
        "url": require_env("INGEST_TEST_TYPESENSE_URL", "typesense"),
        "api_key": require_env("INGEST_TEST_TYPESENSE_API_KEY", "typesense"),
    }


def typesense_admin(coords: Mapping[str, str]) -> typesense.Client:
    """An independent client for checks and cleanup (not the sink's own)."""
    host, port = coords["url"].removeprefix("http://").split(":")
    return typesense.Client(
        {
            "api_key": coords["api_key"],
            "nodes": [{"host": host, "port": port, "protocol": "http"}],
            "connection_timeout_seconds": 5,
        }
    )


@pytest_asyncio.fixture
async def typesense_sink(
    typesense_coords: dict[str, str], tenant: str
) -> AsyncIterator[TypesenseSink]:
    sink = TypesenseSink("typesense-test", fields=TS_FIELDS, **typesense_coords)
    await sink.start()
    yield sink
    await sink.close()
    admin = typesense_admin(typesense_coords)
    try:
        for coll in admin.collections.retrieve():
            if coll["name"].startswith(f"{tenant}__"):
                admin.collections[coll["name"]].delete()
    except Exception:  # server deliberately stopped by the test and not back: nothing to clean
        pass
