"""The webhook door taken before Starlette's layers (`ingest.api.app._App`): every request
is answered as the router and its exception middlewares answer it (status, headers, body),
whatever the path, method or root path, and whatever the endpoint raises; and the door's
requests do not go through the middleware stack at all (what the fast path is for)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.requests import ClientDisconnect
from starlette.responses import Response

import ingest.api.app as app_module
from ingest.api.app import build_app
from ingest.api.auth import Gate
from ingest.auth.guard import Guard
from ingest.config import parse_config
from ingest.service import Service


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    cfg = parse_config(
        {"data_dir": str(tmp_path), "auth": "disabled", "sources": [{"type": "webhook"}]}
    )
    svc = await Service.build(cfg)  # not started: the door answers, nothing is delivered
    try:
        yield svc
    finally:
        await svc.shutdown(timeout=5)


def _apps(service: Service) -> tuple[Any, Any]:
    """The app, and the same app with every request through Starlette's layers."""
    gate = Gate(Guard(None, None), None, service.metrics)
    fast, slow = build_app(service, gate), build_app(service, gate)
    slow.door = None
    return fast, slow


async def _ask(app: Any, method: str, path: str, root_path: str = "") -> tuple[Any, ...]:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        r = await client.request(method, path, content=b"  \n")  # an empty body: 400
    headers = sorted((k, v) for k, v in r.headers.items() if k != "date")
    return r.status_code, headers, r.content


# "¤" stands for an encoded slash (%2F): in the path, not a separator
_SEGMENT = st.text(alphabet="ab-_.%/é \n¤", min_size=0, max_size=6)


def _quoted(segment: str) -> str:
    return quote(segment, safe="/").replace("%C2%A4", "%2F")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@example(method="POST", a="a", b="b", tail="", root_path="/v1", prefix="/v1/webhooks/")
@example(method="POST", a="a", b="b", tail="", root_path="/api", prefix="/api/v1/webhooks/")
@example(method="POST", a="a¤", b="b", tail="", root_path="", prefix="/v1/webhooks/")
@given(
    method=st.sampled_from(["POST", "GET", "PUT"]),
    a=_SEGMENT,
    b=_SEGMENT,
    tail=st.sampled_from(["", "/", "/x", "//"]),
    root_path=st.sampled_from(["", "/api", "/v1"]),
    prefix=st.sampled_from(["/v1/webhooks/", "/api/v1/webhooks/", "/v1/webhook/", "/v1/webhooks"]),
)
async def test_the_door_answers_as_starlette_would(
    service: Service, method: str, a: str, b: str, tail: str, root_path: str, prefix: str
) -> None:
    fast, slow = _apps(service)
    path = f"{prefix}{_quoted(a)}/{_quoted(b)}{tail}"
    assert await _ask(fast, method, path, root_path) == await _ask(slow, method, path, root_path)


async def test_the_doors_requests_skip_the_middleware_stack(service: Service) -> None:
    fast, _ = _apps(service)
    status, _, body = await _ask(fast, "POST", "/v1/webhooks/acme/orders")
    assert status == 400 and b"empty_body" in body
    assert fast.middleware_stack is None  # built at the first request Starlette serves
    assert (await _ask(fast, "GET", "/v1/webhooks/acme/orders"))[0] == 405
    assert fast.middleware_stack is not None


async def test_a_middleware_added_later_sees_the_doors_requests(service: Service) -> None:
    """An operator's or a later change's middleware (auth, tracing) must not be skipped by the
    door's shortcut: with one added, the door goes through Starlette's stack."""
    fast, _ = _apps(service)
    seen: list[str] = []

    class Spy:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            seen.append(scope["path"])
            await self.app(scope, receive, send)

    fast.add_middleware(Spy)
    status, _, body = await _ask(fast, "POST", "/v1/webhooks/acme/orders")
    assert status == 400 and b"empty_body" in body
    assert seen == ["/v1/webhooks/acme/orders"]


@pytest.mark.parametrize(
    ("raised", "status", "code"),
    [
        (RuntimeError("boom"), 500, b"internal_error"),
        (ClientDisconnect(), 400, b"client_disconnected"),
    ],
)
async def test_what_the_endpoint_raises_is_answered_as_starlette_would(
    service: Service, monkeypatch: pytest.MonkeyPatch, raised: Exception, status: int, code: bytes
) -> None:
    async def fails(*_: Any) -> Any:
        raise raised

    monkeypatch.setattr(app_module, "receive", fails)
    answers = []
    for app in _apps(service):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            r = await client.post("/v1/webhooks/acme/orders", content=b"{}")
        answers.append((r.status_code, r.headers.get("content-type"), r.content))
        assert r.status_code == status and code in r.content
    assert answers[0] == answers[1]
    for app in _apps(service):  # a 500 is still raised to the server, which logs it
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            if status == 500:
                with pytest.raises(RuntimeError, match="boom"):
                    await client.post("/v1/webhooks/acme/orders", content=b"{}")
            else:
                r = await client.post("/v1/webhooks/acme/orders", content=b"{}")
                assert r.status_code == 400


async def test_a_disconnect_after_the_answer_began_is_an_error_as_starlette_makes_it(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Breaks(Response):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 202, "headers": []})
            raise ClientDisconnect()

    async def answers(*_: Any) -> Any:
        return Breaks(b"")

    monkeypatch.setattr(app_module, "receive", answers)
    for app in _apps(service):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            with pytest.raises(RuntimeError, match="response already started"):
                await client.post("/v1/webhooks/acme/orders", content=b"{}")
