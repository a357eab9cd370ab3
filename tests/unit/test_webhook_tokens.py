"""A webhook record takes its tenant's tokens once, at the door (ingest/webhook/__init__.py).

The service runs in-process on its embedded stores; the HTTP app is driven through httpx's
ASGI transport. The tenant's bucket holds exactly one body's worth of tokens and refills at
one token a second: charged once, the body is delivered at once; charged again when read
back from the intake, it would wait about a hundred seconds for tokens it already paid.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson

from ingest.api.app import build_app
from ingest.api.auth import Gate
from ingest.auth.guard import Guard
from ingest.config import parse_config
from ingest.service import Service

N = 100


def body(tenant: str) -> bytes:
    return b"\n".join(
        orjson.dumps(
            {
                "schema_version": 3,
                "tenant_id": tenant,
                "entity_type": "order",
                "entity_id": f"o-{i}",
                "revision": 1,
                "occurred_at": "2025-01-01T00:00:00Z",
                "attributes": {},
            }
        )
        for i in range(N)
    )


async def test_webhook_records_take_their_tokens_once(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "data_dir": str(tmp_path),
            "auth": "disabled",
            "sources": [{"type": "webhook"}],
            "tenants": {"acme": {"rate": 1, "burst": N}},
        }
    )
    service = await Service.build(cfg)
    await service.start()
    try:
        transport = httpx.ASGITransport(
            app=build_app(service, Gate(Guard(None, None), None, service.metrics))
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            r = await client.post(
                "/v1/webhooks/acme/orders",
                content=body("acme"),
                headers={"Content-Type": "application/x-ndjson"},
            )
            assert r.status_code == 202, r.text
            again = await client.post("/v1/webhooks/acme/orders", content=body("acme"))
            assert again.status_code == 429  # the door did charge: the bucket is empty

        def delivered() -> float:
            labels = {"tenant": "acme", "source": "orders", "outcome": "delivered"}
            return service.metrics.registry.get_sample_value("ingest_records_total", labels) or 0

        deadline = time.monotonic() + 20
        while delivered() < N and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert delivered() == N  # no second charge: nothing waited for tokens
    finally:
        await service.shutdown(timeout=5)
