"""The fleet control record on real Postgres: compare-and-set under concurrent
writers loses nothing, NOTIFY reaches other connections at once, and followers keep their
state through a Postgres restart and pick up changes made meanwhile."""

from __future__ import annotations

import asyncio
import time

import pytest

from ingest.config import AdmissionConfig, TenantLimits
from ingest.pipeline.admission import Admission, BackpressureState
from ingest.pipeline.control import ControlFollower
from ingest.state.control import (
    ControlStore,
    PostgresControlStore,
    transition,
    update,
)
from ingest.state.postgres import connect_pool
from tests.integration.conftest import PrivateServer

pytestmark = pytest.mark.integration


def admission() -> Admission:
    return Admission(AdmissionConfig(), lambda t: TenantLimits())


async def _concurrent_writers(stores: list[ControlStore]) -> None:
    """Each store (one per pod) toggles brownout rates 10 times, all at once: every write
    lands, as one version each.

    Each lost compare-and-set means another writer's write landed after this one's read, so
    a writer loses at most 10 x (pods - 1) times: that many attempts make the outcome
    independent of scheduling. With update()'s default of 20, a loaded host once let one
    writer lose 20 times in a row (StoreUnavailable), which says nothing about the CAS."""
    attempts = 10 * len(stores)

    async def writer(i: int, store: ControlStore) -> None:
        for k in range(10):
            await update(
                store,
                lambda r, k=k: transition(r, "brownout", rate=(k + 1) / 10, who=f"pod{i}", now=k),
                attempts=attempts,
            )

    await asyncio.gather(*(writer(i, s) for i, s in enumerate(stores)))
    final = await stores[0].read()
    assert final.version == 10 * len(stores)
    assert final.brownout_rate == 1.0


async def test_postgres_compare_and_set_under_concurrent_writers(pg_dsn: str) -> None:
    pools = [await connect_pool(pg_dsn) for _ in range(4)]
    stores: list[ControlStore] = [PostgresControlStore(p, pg_dsn) for p in pools]
    try:
        for s in stores:
            await s.ensure_schema()  # every pod at start: the seed row is written once
        assert (await stores[0].read()).version == 0
        await _concurrent_writers(stores)
    finally:
        for p in pools:
            await p.close()


async def test_notify_reaches_the_other_pods_at_once(pg_dsn: str) -> None:
    pools = [await connect_pool(pg_dsn) for _ in range(3)]
    stores = [PostgresControlStore(p, pg_dsn) for p in pools]
    pods = [ControlFollower(s, admission(), poll_seconds=30.0) for s in stores]  # no polling
    stopping = asyncio.Event()
    try:
        await stores[0].ensure_schema()
        tasks = [asyncio.create_task(p.run(stopping)) for p in pods]
        for _ in range(100):
            if all(s.listening for s in stores):
                break
            await asyncio.sleep(0.05)
        assert all(s.listening for s in stores)
        t0 = time.monotonic()
        await pods[0].submit("pause", rate=None, who="op")
        while not all(p.admission.state is BackpressureState.PAUSED for p in pods):
            assert time.monotonic() - t0 < 2.0, [p.snapshot() for p in pods]
            await asyncio.sleep(0.01)
        assert pods[1].snapshot()["notifications"] == "listening"
        stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
    finally:
        for s in stores:
            await s.close()
        for p in pools:
            await p.close()


async def test_postgres_restart_keeps_state_then_catches_up(
    private_postgres: PrivateServer,
) -> None:
    url = private_postgres.url
    pools = [await connect_pool(url) for _ in range(2)]
    stores = [PostgresControlStore(p, url) for p in pools]
    a, b = (ControlFollower(s, admission(), poll_seconds=0.2) for s in stores)
    stopping = asyncio.Event()
    try:
        await stores[0].ensure_schema()
        await a.submit("resume", rate=None, who="op")  # whatever an earlier test left
        await a.submit("drain", rate=None, who="op")
        task = asyncio.create_task(b.run(stopping))
        for _ in range(200):  # its first poll (every 0.2 s), however loaded the host
            if b.admission.state is BackpressureState.DRAIN:
                break
            await asyncio.sleep(0.05)
        assert b.admission.state is BackpressureState.DRAIN
        await asyncio.to_thread(private_postgres.run, "stop-server")
        for _ in range(200):  # a poll that finds Postgres gone says so
            if b.snapshot()["error"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # more failed polls
        assert b.admission.state is BackpressureState.DRAIN  # the outage flips nothing
        assert b.snapshot()["error"] and "keeps its applied state (drain)" in b.snapshot()["error"]
        await asyncio.to_thread(private_postgres.run, "start-server")
        for _ in range(50):
            try:
                await a.submit("resume", rate=None, who="op after restart")
                break
            except Exception:
                await asyncio.sleep(0.2)
        for _ in range(100):
            if b.admission.state is BackpressureState.NORMAL and b.snapshot()["error"] is None:
                break
            await asyncio.sleep(0.05)
        assert b.admission.state is BackpressureState.NORMAL
        assert b.snapshot()["desired"]["updated_by"] == "op after restart"
        for _ in range(150):  # the listener comes back within LISTEN_RETRY_SECONDS
            if stores[1].listening:
                break
            await asyncio.sleep(0.05)
        assert stores[1].listening
        stopping.set()
        await asyncio.wait_for(task, 5.0)
    finally:
        for s in stores:
            await s.close()
        for p in pools:
            await p.close()
