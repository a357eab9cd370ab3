"""Importing the S3 source leaves httpx out (aiobotocore's optional backend, unused by it).

Each case runs in a fresh interpreter: what counts is what the first import of
`ingest.sources.s3` brings in, as in a pod's fork server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = """\
import asyncio, sys
import ingest.sources.s3
print("httpx" in sys.modules, "anyio" in sys.modules, "httpx2" in sys.modules)
from aiobotocore.session import get_session

async def client() -> str:  # an aiohttp client, built without httpx (sends nothing)
    async with get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:1",
        aws_access_key_id="a", aws_secret_access_key="b",
    ) as s3:
        return type(s3._endpoint.http_session).__name__

print(asyncio.run(client()))
import httpx  # later imports are not refused
print(httpx.Client is not None)
"""


def run(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        check=True,
    )  # fmt: skip
    return out.stdout.split()


def test_the_s3_source_imports_without_httpx_and_its_clients_still_work() -> None:
    assert run(PROBE) == ["False", "False", "False", "AIOHTTPSession", "True"]


def test_an_httpx_imported_before_stays_what_it_was() -> None:
    code = (
        "import sys, httpx; before = sys.modules['httpx']\n"
        "import ingest.sources.s3\n"
        "import aiobotocore._httpx as h\n"
        "print(sys.modules['httpx'] is before, h.httpx is before)\n"
    )
    assert run(code) == ["True", "True"]
