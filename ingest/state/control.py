"""The fleet's control record: what operators asked every pod to do, in the shared store.

`/admin/drain|pause|resume|brownout` sent to any pod writes one record; every pod follows it
(`ingest.pipeline.control.ControlFollower`; in a pod of N workers its control plane, which
hands the modes to its worker processes). The record keeps the operator's three switches,
not one state, so the admission rules stay as they are (drain while paused stays paused;
brownout while draining keeps its rate for after), plus who changed it, when, with which
action, and a version:

    {"paused": false, "draining": true, "brownout_rate": null, "version": 7,
     "action": "drain", "updated_by": "10.0.0.7 via ingest-worker-5d9c-abc12-1",
     "updated_at": 1735689600.0}

Writes are compare-and-set on the version (`update`): two pods changing it at once both
land, one after the other, never one over the other. Where it lives:

    production   Postgres table `fleet_control` (one row), NOTIFY `ingest_control` on change
    embedded     in the process (`MemoryControlStore`): today's per-process behaviour, a
                 restart starts normal

Postgres because the record must outlive a store restart: a lost record would read as
"normal" and resume a fleet an operator had paused.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import orjson

from ingest.errors import StoreUnavailable

log = logging.getLogger(__name__)
CHANNEL = "ingest_control"
ACTIONS = ("drain", "pause", "resume", "brownout")


class ControlRecordMissing(Exception):
    """The store answers but holds no control record (it was deleted or the store reset)."""


@dataclass(frozen=True, slots=True)
class ControlRecord:
    paused: bool = False
    draining: bool = False
    brownout_rate: float | None = None
    version: int = 0
    action: str = "initial"
    updated_by: str = "-"
    updated_at: float = 0.0

    @property
    def state(self) -> str:
        """The operator-set state, by the admission precedence paused > drain > brownout."""
        if self.paused:
            return "paused"
        if self.draining:
            return "drain"
        return "brownout" if self.brownout_rate is not None else "normal"

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> ControlRecord:
        d = orjson.loads(raw)
        rate = d.get("brownout_rate")
        return cls(
            paused=bool(d.get("paused", False)),
            draining=bool(d.get("draining", False)),
            brownout_rate=None if rate is None else float(rate),
            version=int(d.get("version", 0)),
            action=str(d.get("action", "initial")),
            updated_by=str(d.get("updated_by", "-")),
            updated_at=float(d.get("updated_at", 0.0)),
        )


def transition(
    rec: ControlRecord, action: str, *, rate: float | None, who: str, now: float
) -> ControlRecord:
    """The record after an operator action (the same rules as `Admission`'s methods)."""
    if action == "drain":
        new = replace(rec, draining=True)
    elif action == "pause":
        new = replace(rec, paused=True)
    elif action == "resume":
        new = replace(rec, paused=False, draining=False, brownout_rate=None)
    elif action == "brownout":
        if rate is None or not 0.0 < rate <= 1.0:
            raise ValueError(f"brownout rate must be in (0, 1], got {rate}")
        new = replace(rec, brownout_rate=rate)
    else:
        raise ValueError(f"unknown control action {action!r}")
    return replace(new, version=rec.version + 1, action=action, updated_by=who, updated_at=now)


class ControlStore(Protocol):
    kind: str  # "postgres" | "memory", for health

    async def ensure_schema(self) -> None: ...

    async def read(self) -> ControlRecord:
        """The record; StoreUnavailable when the store does not answer, ControlRecordMissing
        when it answers without one."""
        ...

    async def write(self, expected_version: int, record: ControlRecord) -> bool:
        """Store `record` iff the stored version is still `expected_version` (and notify)."""
        ...

    async def listen(self, on_change: Callable[[], None]) -> bool:
        """Call `on_change` on every change from now on; False if this store cannot notify
        (callers then rely on polling). Calling it again after a lost connection re-listens."""
        ...

    @property
    def listening(self) -> bool: ...

    async def close(self) -> None: ...


async def update(
    store: ControlStore, change: Callable[[ControlRecord], ControlRecord], attempts: int = 20
) -> ControlRecord:
    """Read, change, compare-and-set; again on a concurrent write. Returns what was stored.

    Each lost round means another writer's write landed. The wait before the next round is
    random, at most 10 ms doubling up to 0.64 s, so writers that all started at once (a script
    sending one action to every pod of a fleet) spread out instead of colliding in step."""
    for attempt in range(attempts):
        current = await store.read()
        new = change(current)
        if await store.write(current.version, new):
            return new
        if attempt + 1 < attempts:
            await asyncio.sleep(random.uniform(0.0, 0.01 * 2 ** min(attempt, 6)))
    raise StoreUnavailable(store.kind, "fleet_control", f"{attempts} concurrent writes in a row")


# ---------------------------------------------------------------------------- embedded


class MemoryControlStore:
    """Embedded mode: the record lives in this process (a pod's control plane) and ends with
    it, so a restart starts `normal` as it always has; there is no fleet to share it with."""

    kind = "memory"

    def __init__(self) -> None:
        self._record = ControlRecord()

    async def ensure_schema(self) -> None:
        return None

    async def read(self) -> ControlRecord:
        return self._record

    async def write(self, expected_version: int, record: ControlRecord) -> bool:
        if self._record.version != expected_version:
            return False
        self._record = record
        return True

    async def listen(self, on_change: Callable[[], None]) -> bool:
        return False  # the only writer applies its own writes at once

    @property
    def listening(self) -> bool:
        return False

    async def close(self) -> None:
        return None


# -------------------------------------------------------------------------- Postgres


class PostgresControlStore:
    """`fleet_control` in Postgres; LISTEN/NOTIFY on a connection of its own."""

    kind = "postgres"

    def __init__(self, pool: Any, dsn: str) -> None:  # asyncpg.Pool from ingest.state.postgres
        self._pool = pool
        self._dsn = dsn
        self._conn: Any = None  # the LISTEN connection
        self._on_change: Callable[[], None] | None = None

    async def _run(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        from ingest.state.postgres import on_conn

        return await on_conn(self._pool, fn)

    async def ensure_schema(self) -> None:
        """The table comes with the state migrations (`ingest.state.postgres.migrate`, under
        their advisory lock, as N pods start at once); then the row is seeded once."""
        from ingest.state.postgres import migrate

        await migrate(self._pool)
        seed = ControlRecord().to_json().decode()
        await self._run(
            lambda c: c.execute(
                "INSERT INTO fleet_control VALUES (1, 0, $1::jsonb) ON CONFLICT (id) DO NOTHING",
                seed,
            )
        )

    async def read(self) -> ControlRecord:
        doc = await self._run(
            lambda c: c.fetchval("SELECT doc::text FROM fleet_control WHERE id = 1")
        )
        if doc is None:
            raise ControlRecordMissing("table fleet_control has no row")
        return ControlRecord.from_json(doc)

    async def write(self, expected_version: int, record: ControlRecord) -> bool:
        async def run(c: Any) -> bool:
            async with c.transaction():
                status = await c.execute(
                    "UPDATE fleet_control SET version = $1, doc = $2::jsonb"
                    " WHERE id = 1 AND version = $3",
                    record.version,
                    record.to_json().decode(),
                    expected_version,
                )
                if status != "UPDATE 1":
                    return False
                await c.execute("SELECT pg_notify($1, $2)", CHANNEL, str(record.version))
            return True

        return bool(await self._run(run))

    async def listen(self, on_change: Callable[[], None]) -> bool:
        import asyncpg  # type: ignore[import-untyped]

        from ingest.state.postgres import CONNECTION_ERRORS, _where

        await self._drop_listener()
        self._on_change = on_change
        try:
            conn = await asyncpg.connect(self._dsn, timeout=2.0)
            await conn.add_listener(CHANNEL, self._notified)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(
                "postgres", _where(self._dsn), f"LISTEN {CHANNEL}: {type(exc).__name__}: {exc}"
            ) from exc
        self._conn = conn
        return True

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if self._on_change is not None:
            self._on_change()

    @property
    def listening(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def _drop_listener(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:
                conn.terminate()

    async def close(self) -> None:
        await self._drop_listener()
