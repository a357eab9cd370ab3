"""Fixtures of the e2e tests that run the service in production mode: a Redis of the module's
own, a Postgres schema of the test's own on the shared server (tests/e2e/_production.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e._production import (
    PrivateServer,
    drop_schema,
    fresh_schema,
    private_redis,
    shared_env,
)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[PrivateServer]:
    """`scripts/services/redis.sh` on a free port: the module's tests may stop or flush it."""
    server = private_redis()
    yield server
    server.close()


@pytest.fixture()
def pg_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """A DSN whose search_path is a fresh schema named after the test module, dropped after."""
    url = shared_env()["INGEST_TEST_POSTGRES_URL"]
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    schema, dsn = fresh_schema(url, f"e2e_{module}")
    yield dsn
    drop_schema(url, schema)
