"""A direct GET never follows a redirect with its signed headers: a 3xx is handed back
(`DirectGet.get` -> None) for botocore to handle, as botocore handles S3's region redirects,
and the place it points to is never asked. Two plain local HTTP servers stand in for the
endpoint and the redirect's target (the S3 behaviour itself is tested against SeaweedFS in
tests/integration/test_s3_direct.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from botocore.credentials import ReadOnlyCredentials  # type: ignore[import-untyped]

from ingest.sources.s3_direct import DirectGet


class _Credentials:
    async def get_frozen_credentials(self) -> ReadOnlyCredentials:
        return ReadOnlyCredentials("AKIDEXAMPLE", "secret", None)


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_handed_back_and_not_followed(
    session: aiohttp.ClientSession, status: int
) -> None:
    target_hits: list[str] = []

    async def target(request: web.Request) -> web.Response:
        target_hits.append(request.headers.get("Authorization", ""))
        return web.Response(body=b"elsewhere")

    elsewhere = web.Application()
    elsewhere.router.add_get("/{tail:.*}", target)
    target_runner, target_url = await _serve(elsewhere)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": target_url + request.path})

    endpoint = web.Application()
    endpoint.router.add_get("/{tail:.*}", redirect)
    endpoint_runner, endpoint_url = await _serve(endpoint)
    try:
        direct = DirectGet(
            f"{endpoint_url}/bucket/", "us-east-1", "s3", {}, _Credentials(), session, []
        )
        assert await direct.get("k.jsonl", {"If-Match": '"etag"'}) is None
        assert target_hits == []
        assert direct.sent == 0
    finally:
        await endpoint_runner.cleanup()
        await target_runner.cleanup()


async def test_a_200_is_answered_here(session: aiohttp.ClientSession) -> None:
    """The same servers' other answer: the check above can fail (a 200 is taken)."""

    async def ok(request: web.Request) -> web.Response:
        assert request.headers["Authorization"].startswith("AWS4-HMAC-SHA256 ")
        return web.Response(body=b"line\n")

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    runner, url = await _serve(app)
    try:
        direct = DirectGet(f"{url}/bucket/", "us-east-1", "s3", {}, _Credentials(), session, [])
        answer = await direct.get("k.jsonl", {})
        assert answer is not None
        assert b"".join([c async for c in direct.body(answer, 1024)]) == b"line\n"
        assert direct.sent == 1
    finally:
        await runner.cleanup()
