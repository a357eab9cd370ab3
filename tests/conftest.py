"""Shared test helpers. Servers come from `scripts/services/up.sh` (run by `make test`)."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pytest
from hypothesis import settings

# Property tests check answers, not speed: on 2 loaded cores one example can take far longer
# than hypothesis' default 200 ms deadline, and a deadline miss is then a failure about nothing.
settings.register_profile("ingest", deadline=None)
settings.load_profile("ingest")

T = TypeVar("T")


def require_env(name: str, script: str) -> str:
    """A server coordinate from the environment, or a test error saying how to get it."""
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: start the server with `scripts/services/up.sh {script}` and "
            f"source the env file it names on its last line (make test does both)",
            pytrace=False,
        )
    return value


# tests/image/ runs the container image (root + podman): `make image-test` only.
collect_ignore = [] if os.environ.get("INGEST_IMAGE_TEST") == "1" else ["image"]


def wait_for(cond: Callable[[], T], timeout: float = 60.0, what: str = "condition",
             interval: float = 0.1) -> T:
    """Poll `cond()` until it returns something truthy and return that; fail naming `what`
    after `timeout`. An exception from `cond` counts as "not yet" (a service restarting)."""
    deadline = time.monotonic() + timeout
    last_exc = "none"
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:
            # its text only: the exception itself would keep `cond`'s frame (and any sqlite3
            # connection in it, with its -wal file) alive until the next garbage collection
            last_exc = f"{type(exc).__name__}: {exc}"
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def v3_body(tenant: str, entity_type: str, entity_id: str, revision: int, *,
            occurred_at: str = "2025-01-01T00:00:00Z", attributes: dict[str, Any] | None = None,
            relations: Iterable[tuple[str, str, str]] = (), **extra: Any) -> dict[str, Any]:
    """A schema-3 record body; `relations` as (type, target_type, target_id); `extra` adds or
    replaces top-level keys (deleted, priority, ...). The one builder the tests' record
    helpers share."""
    body: dict[str, Any] = {"schema_version": 3, "tenant_id": tenant,
                            "entity_type": entity_type, "entity_id": entity_id,
                            "revision": revision, "occurred_at": occurred_at,
                            "attributes": attributes if attributes is not None else {}}
    if relations:
        body["relations"] = [{"type": t, "target_type": tt, "target_id": tid}
                             for t, tt, tid in relations]
    body.update(extra)
    return body


def rec(entity_id: str, revision: int = 1, tenant: str = "acme-corp",
        **extra: Any) -> dict[str, Any]:
    """A valid input record (schema 3) of `tenant`; `extra` replaces or adds top-level keys."""
    attributes = extra.pop("attributes", {"amount": float(revision)})
    return v3_body(tenant, "order", entity_id, revision, attributes=attributes, **extra)


async def until(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition",
                step: float = 0.05) -> None:
    """`wait_for` inside an event loop: awaits between polls; `cond` may return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)
