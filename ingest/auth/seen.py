"""Signatures already accepted inside the tolerance window, so an exact replay is refused.

A request is identified by (tenant, t, SHA-256 of the body): the same body signed at the same
second is the same request whichever secret or how many `v1=` entries sign it. The key is
reserved before the body is made durable and released again when the body is not accepted
(429, 503), so a sender may retry a refused request as it was.

Kept where every worker sees it: the embedded SQLite state file, or Redis in production
(`SET NX` with the window as expiry). `MemorySeen` serves one process (unit tests).
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol

from ingest.errors import StoreUnavailable
from ingest.state.sqlite import autocommit, immediate

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


class SQLiteSeen:
    """Table `seen_signatures` in the embedded state.db (created by its migrations)."""

    def __init__(self, db: Any, clock: Callable[[], float] = time.time) -> None:
        self._db = db  # ingest.state.sqlite.SQLiteDB
        self._clock = clock
        self._writes = 0

    async def reserve(self, key: bytes, expires_at: float) -> bool:
        now = self._clock()
        self._writes += 1
        prune = self._writes % 256 == 0

        def run(c: sqlite3.Connection) -> bool:
            # under the file's writer lock, as every writer of state.db (ingest.state.sqlite)
            with immediate(c):
                if prune:
                    c.execute("DELETE FROM seen_signatures WHERE expires_at <= ?", (now,))
                cur = c.execute(
                    "INSERT INTO seen_signatures (key, expires_at) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at"
                    " WHERE seen_signatures.expires_at <= ?",
                    (key, expires_at, now),
                )
                return cur.rowcount == 1

        result: bool = await self._db.call("seen-signatures", run)
        return result

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
