"""Names in checkpoints, in every store: any Unicode text round-trips exactly; text that is
not Unicode (a file name with undecodable bytes, held with lone surrogates) is refused with a
ValueError that names the checkpoint, never a driver's encoding error."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.state.base import CheckpointStore
from ingest.state.redis import RedisCheckpointStore, redis_client
from ingest.state.sqlite import SQLiteCheckpointStore, SQLiteDB

pytestmark = pytest.mark.integration

TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)
UNDECODABLE = st.binary(min_size=1, max_size=20).map(
    lambda b: (b + b"\xff").decode("utf-8", "surrogateescape")
)


def positions(name: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"file": name, "id": TEXT, "offset": st.integers(0, 2**62), "grown": st.booleans()}
    )


async def sqlite_store(tmp: Path) -> tuple[CheckpointStore, Callable[[], Any]]:
    db = await SQLiteDB.open(tmp / "state.db")
    return SQLiteCheckpointStore(db, "w"), db.close


def check_round_trips(make: Callable[[], Any]) -> None:
    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(tenant=TEXT, source=TEXT, position=positions(TEXT))
    def run(tenant: str, source: str, position: dict[str, Any]) -> None:
        async def go() -> None:
            store, close = await make()
            try:
                await store.save(tenant, source, position)
                assert await store.load(tenant, source) == position
                await store.delete(tenant, source)
            finally:
                await close()

        asyncio.run(go())

    run()


def check_refuses(make: Callable[[], Any]) -> None:
    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(bad=UNDECODABLE, where=st.sampled_from(["tenant", "source", "file"]))
    def run(bad: str, where: str) -> None:
        async def go() -> None:
            store, close = await make()
            try:
                args = {"tenant": "acme", "source": "inbox", "file": "x.jsonl"} | {where: bad}
                with pytest.raises(ValueError, match="not UTF-8") as err:
                    await store.save(args["tenant"], args["source"], {"file": args["file"]})
                assert "\\x" in str(err.value)  # the bytes, shown escaped
                str(err.value).encode("utf-8")  # the message itself is printable
            finally:
                await close()

        asyncio.run(go())

    run()


def test_sqlite_any_name_round_trips_or_is_refused_clearly() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check_round_trips(lambda: sqlite_store(Path(tmp)))
        check_refuses(lambda: sqlite_store(Path(tmp)))


@pytest.mark.integration
def test_redis_any_name_round_trips_or_is_refused_clearly(redis_url: str) -> None:
    async def make() -> tuple[CheckpointStore, Callable[[], Any]]:
        client: aioredis.Redis = redis_client(redis_url)
        return RedisCheckpointStore(client, "w"), client.aclose

    check_round_trips(make)
    check_refuses(make)
