"""N workers of a pod start at once and each migrates the state (leases table included):
none may fail (the migrations run under an advisory lock).

Bug seen in CI: two workers' `CREATE TABLE IF NOT EXISTS` raced and one died with
UniqueViolation on pg_type (a worker restart hid it; a test saw the exit)."""

from __future__ import annotations

import asyncio

import asyncpg  # type: ignore[import-untyped]
import pytest

from ingest.state.postgres import migrate

pytestmark = pytest.mark.integration


async def test_workers_creating_the_lease_table_together_all_succeed(pg_dsn: str) -> None:
    for round_ in range(5):  # a fresh table each round: the race is at creation
        pools = [await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1) for _ in range(8)]
        try:
            if round_:  # the first round starts from an empty schema
                await pools[0].execute(
                    "DROP TABLE ingest_source_leases; DELETE FROM schema_migrations"
                    " WHERE version = 4"
                )
            await asyncio.gather(*(migrate(p) for p in pools))
            assert await pools[0].fetchval("SELECT count(*) FROM ingest_source_leases") == 0
        finally:
            await asyncio.gather(*(p.close() for p in pools))
