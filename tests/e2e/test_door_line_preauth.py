"""The webhook door's line of large senders against a client without the tenant's secret.

The line is kept from the headers, before the signature (over the body) can be checked
(ingest/pipeline/closed_loop.py `check_open`). Review of 2026-12-01: a client that knew a
tenant's name and sent well-formed signature headers with a large Content-Length could give it
a place in line, keep its place alive, take its turn (its body read, refused 401) and have any
number of bodies read while the intake was at its bound. Now only a (tenant, peer host) pair
that authenticated before acts on the line before authentication, one body is read at a time
there, and a failed signature takes that right from its host.

The service runs as a process with a sink that never answers (a Postgres port nobody listens
on; retries without end and no breaker, so delivery waits the outage out), so the intake
stays at its bound (the floor, `min_backlog_records`, the drain rate never measured) for the
whole test. The honest client
posts from 127.0.0.1, the attacker from 127.0.0.2 (another peer host on the loopback).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.e2e._auth import sign_headers
from tests.e2e._service import ServiceProcess, free_port

pytestmark = pytest.mark.e2e
FLOOR = 50  # admission.intake.min_backlog_records: the bound while nothing drains
RETRY_CAP = 2
KNOWN = ("a", "h", "k1", "k2", "k3")  # tenants that sent a body while the intake had room
ATTACKER = "127.0.0.2"


def ndjson(tenant: str, prefix: str, n: int) -> bytes:
    return "\n".join(
        json.dumps({"schema_version": 3, "tenant_id": tenant, "entity_type": "order",
                    "entity_id": f"{prefix}-{i}", "revision": 1,
                    "occurred_at": "2025-01-01T00:00:00Z", "attributes": {"amount": i}})
        for i in range(n)
    ).encode()  # fmt: skip


def start(tmp_path: Path) -> ServiceProcess:
    config = tmp_path / "ingest.yaml"
    config.write_text(
        "tenants:\n"
        + "".join(f"  {t}: {{rate: 1000000, burst: 1000000}}\n" for t in (*KNOWN, "fill"))
        + "sources: [{type: webhook}]\n"
        f'sinks: [{{type: postgres, name: pg, dsn: "postgresql://u:p@127.0.0.1:{free_port()}/db"}}]\n'
        # the sink's outage is waited out, never DLQ'd: nothing leaves the intake
        "retry: {max_attempts: 1000000, max_delay_seconds: 1, max_total_seconds: 100000}\n"
        "breaker: {failure_threshold: 1000000}\n"
        "admission:\n"
        f"  intake: {{lag_budget_seconds: 0.1, min_backlog_records: {FLOOR},"
        f" max_retry_after_seconds: {RETRY_CAP}}}\n"
    )  # fmt: skip
    svc = ServiceProcess(tmp_path / "d", config=config).start()
    try:
        for tenant in KNOWN:  # authenticated once, from 127.0.0.1, while the intake had room
            r = svc.post_webhook(tenant, "shop", ndjson(tenant, "hello", 1),
                                 content_type="application/x-ndjson")  # fmt: skip
            assert r.status_code == 202, r.text
        r = svc.post_webhook("fill", "shop", ndjson("fill", "f", FLOOR - len(KNOWN)),
                             content_type="application/x-ndjson")  # fmt: skip
        assert r.status_code == 202, r.text
        wait_for(lambda: intake(svc)["records"] >= FLOOR, 60, "the intake at its bound")
    except BaseException:
        svc.stop()
        raise
    return svc


def intake(svc: ServiceProcess) -> dict[str, Any]:
    data: dict[str, Any] = svc.health()["backpressure"]["intake"]
    return data


def forged(svc: ServiceProcess, client: httpx.Client, tenant: str) -> httpx.Response:
    """Well-formed signature headers for `tenant` (signed over other bytes: no secret), a
    large body (~1,000 records' worth of bytes, over the bound)."""
    body = b'{"x": 1}\n' * 20_000
    headers = sign_headers(tenant, b"not the body", content_type="application/x-ndjson")
    return client.post(f"{svc.url}/v1/webhooks/{tenant}/shop", content=body,
                       headers=headers, timeout=30)  # fmt: skip


def attacker() -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=ATTACKER))


def test_a_client_without_the_secret_cannot_act_on_the_line(tmp_path: Path) -> None:
    """At the bound, with the line empty and then behind a hold, the forged requests neither
    have their bodies read (before: every one, 401) nor take places for the tenants they name
    (before: one each, so 1,024 known names filled the line), nor keep an honest tenant's
    place alive once it stopped re-sending (before: kept, and its turn taken and spent)."""
    svc = start(tmp_path)
    statuses: list[int] = []
    try:
        with attacker() as evil:
            # the line empty, the others' turn over: bodies were read at the bound, any number
            for _ in range(5):
                statuses.append(forged(svc, evil, "a").status_code)
            # an honest large body (h, from its own host) is read and holds the door
            r = svc.post_webhook("h", "shop", ndjson("h", "big", 1000),
                                 content_type="application/x-ndjson")  # fmt: skip
            assert r.status_code == 429 and "taken alone" in r.text, r.text
            # honest `a` takes its place behind the hold, before its body is read
            r = svc.post_webhook("a", "shop", ndjson("a", "big", 1000),
                                 content_type="application/x-ndjson")  # fmt: skip
            assert r.status_code == 429 and "number 1 in line" in r.text, r.text
            assert intake(svc)["hold_queue"] == ["a"]
            # places for other known tenants: refused without one
            for tenant in ("k1", "k2", "k3"):
                statuses.append(forged(svc, evil, tenant).status_code)
            queue = intake(svc)["hold_queue"]
            assert queue == ["a"], queue
            # `a` stops re-sending; the forged requests naming it keep coming: its place lapses
            stop = threading.Event()

            def keep_alive() -> None:
                with attacker() as c:
                    while not stop.wait(0.5):
                        with contextlib.suppress(httpx.HTTPError):
                            statuses.append(forged(svc, c, "a").status_code)

            t = threading.Thread(target=keep_alive, daemon=True)
            t.start()
            try:  # its Retry-After (<= 2 s) + 10 s, then the next request prunes it
                wait_for(lambda: "a" not in intake(svc)["hold_queue"], 45, "a's place lapsed")
            finally:
                stop.set()
                t.join(60)
    finally:
        svc.stop()
    # not one forged body was read (a 401 is a body read and its signature checked)
    assert statuses and set(statuses) == {429}, statuses


def test_an_honest_large_sender_has_its_turn_while_its_name_is_forged(tmp_path: Path) -> None:
    """`a` waits in line behind a hold and retries as told while a client elsewhere sends
    forged requests naming it five times a second. Its turn is its own: its body is read and
    the door held for it; no forged body is read (before: the first let through at its turn
    was the forger's, read and refused 401, and every forged body in the turn after it)."""
    svc = start(tmp_path)
    statuses: list[int] = []
    stop = threading.Event()

    def forge() -> None:
        with attacker() as c:
            while not stop.wait(0.2):
                with contextlib.suppress(httpx.HTTPError):
                    statuses.append(forged(svc, c, "a").status_code)

    t = threading.Thread(target=forge, daemon=True)
    held: httpx.Response | None = None
    refusals: list[str] = []
    try:
        r = svc.post_webhook("h", "shop", ndjson("h", "big", 1000),
                             content_type="application/x-ndjson")  # fmt: skip
        assert r.status_code == 429 and "taken alone" in r.text, r.text  # h holds the door
        t.start()
        deadline = time.monotonic() + 120  # h's hold lapses (12 s), the others' turn (12 s)
        i = 0
        while held is None and time.monotonic() < deadline:
            i += 1
            r = svc.post_webhook("a", "shop", ndjson("a", f"big{i}", 1000),
                                 content_type="application/x-ndjson")  # fmt: skip
            assert r.status_code == 429, r.text
            if "new requests wait meanwhile" in r.text:  # its body was read: the door is its
                held = r
            else:
                refusals.append(r.json()["reason"])
                time.sleep(float(r.headers["Retry-After"]))  # as told
    finally:
        stop.set()
        t.join(60)
        svc.stop()
    assert held is not None, refusals[-3:]
    assert "taken alone" in held.text, held.text
    assert len(statuses) >= 10 and set(statuses) == {429}, statuses
