"""Signatures already accepted inside the tolerance window, so an exact replay is refused.

A request is identified by (tenant, t, SHA-256 of the body): the same body signed at the same
second is the same request whichever secret or how many `v1=` entries sign it. The key is
reserved before the body is made durable and released again when the body is not accepted
(429, 503), so a sender may retry a refused request as it was.

Embedded, when the intake is a table of the same state.db (`ingest.auth.setup.guard`), the
key is not reserved on its own: the door looks it up (a read, no writer lock) and the
intake's append reserves it in the body's own transaction (`Reservation`), which refuses a
replay that won the race (`ingest.webhook.Replayed`). One take of the file's writer lock a
request instead of two (docs/benchmarks.md, disk's section of 2026-12-04 10:13), and a body
not made durable leaves no key behind, as a release would: the reservation rolls back with it.

Kept where every worker sees it: the embedded SQLite state file, or Redis in production
(`SET NX` with the window as expiry). `MemorySeen` serves one process (unit tests).
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ingest.errors import StoreUnavailable
from ingest.state.sqlite import autocommit, fetchone, immediate

REDIS_PREFIX = "ingest_webhook_seen:"


def request_key(tenant: str, timestamp: int, body: bytes) -> bytes:
    return hashlib.sha256(
        b"%s\0%d\0%s" % (tenant.encode(), timestamp, hashlib.sha256(body).digest())
    ).digest()


class SeenSignatures(Protocol):
    async def reserve(self, key: bytes, expires_at: float) -> bool:
        """True the first time `key` is seen before `expires_at`; False for a replay."""
        ...

    async def release(self, key: bytes) -> None: ...


class MemorySeen:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._until: dict[bytes, float] = {}
        self._clock = clock

    async def reserve(self, key: bytes, expires_at: float) -> bool:
        now = self._clock()
        if len(self._until) > 10_000:
            self._until = {k: t for k, t in self._until.items() if t > now}
        if self._until.get(key, 0.0) > now:
            return False
        self._until[key] = expires_at
        return True

    async def release(self, key: bytes) -> None:
        self._until.pop(key, None)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A key's reservation, run inside a write transaction of state.db that the caller holds
    (its own in `SQLiteSeen.reserve`, the intake append's in joint mode). True: reserved;
    False: the key is held, a replay. `prune`: expired keys are deleted first."""

    key: bytes
    expires_at: float
    now: float
    prune: bool

    def __call__(self, c: sqlite3.Connection) -> bool:
        if self.prune:
            c.execute("DELETE FROM seen_signatures WHERE expires_at <= ?", (self.now,))
        cur = c.execute(
            "INSERT INTO seen_signatures (key, expires_at) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at"
            " WHERE seen_signatures.expires_at <= ?",
            (self.key, self.expires_at, self.now),
        )
        return cur.rowcount == 1


class SQLiteSeen:
    """Table `seen_signatures` in the embedded state.db (created by its migrations)."""

    def __init__(self, db: Any, clock: Callable[[], float] = time.time) -> None:
        self._db = db  # ingest.state.sqlite.SQLiteDB
        self._clock = clock
        self._writes = 0

    @property
    def path(self) -> Path:
        """The state file: an intake in the same file can take the reservations."""
        path: Path = self._db.path
        return path

    def reservation(self, key: bytes, expires_at: float) -> Reservation:
        self._writes += 1
        return Reservation(key, expires_at, self._clock(), self._writes % 256 == 0)

    async def reserve(self, key: bytes, expires_at: float) -> bool:
        reserve = self.reservation(key, expires_at)

        def run(c: sqlite3.Connection) -> bool:
            # under the file's writer lock, as every writer of state.db (ingest.state.sqlite)
            with immediate(c):
                return reserve(c)

        result: bool = await self._db.call("seen-signatures", run)
        return result

    async def held(self, key: bytes) -> bool:
        """Whether `key` is reserved and not expired: a read, no writer lock (joint mode's
        early refusal of a replay; the reservation in the append is what decides)."""
        row = await self._db.call(
            "seen-signatures",
            fetchone(
                "SELECT 1 FROM seen_signatures WHERE key = ? AND expires_at > ?",
                (key, self._clock()),
            ),
        )
        return row is not None

    async def release(self, key: bytes) -> None:
        await self._db.call(
            "seen-signatures",
            lambda c: autocommit(c, "DELETE FROM seen_signatures WHERE key = ?", (key,)),
        )


class RedisSeen:
    def __init__(self, client: Any, clock: Callable[[], float] = time.time) -> None:
        self._client = client  # redis.asyncio.Redis
        self._clock = clock

    async def reserve(self, key: bytes, expires_at: float) -> bool:
        ttl_ms = max(1, int((expires_at - self._clock()) * 1000))
        try:
            ok = await self._client.set(
                REDIS_PREFIX.encode() + key.hex().encode(), b"1", nx=True, px=ttl_ms
            )
        except Exception as exc:
            raise StoreUnavailable("redis", "seen-signatures", str(exc)) from exc
        return bool(ok)

    async def release(self, key: bytes) -> None:
        try:
            await self._client.delete(REDIS_PREFIX.encode() + key.hex().encode())
        except Exception as exc:
            raise StoreUnavailable("redis", "seen-signatures", str(exc)) from exc
