"""Webhook load generator: N concurrent clients posting fixed-size batches for a while.

asyncio + aiohttp (one event loop, one connection per client), light enough that 100 clients
really are concurrent on a 2-core machine next to the service. Each record's entity id is
unique (`<prefix>-c<client>-b<batch>-<i>`), so what was accepted is known exactly and can be
compared with what the sink holds. A client that gets 429 waits the Retry-After it was given
(at most until the end) and sends its next batch; a 202 batch is never sent again. Requests
are signed as the e2e harness signs them (tests/e2e/_auth.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import orjson

from tests.e2e._auth import sign_headers
from tests.e2e._feed import occurred_at


@dataclass
class LoadResult:
    seconds: float = 0.0
    status: Counter[int] = field(default_factory=Counter)
    accepted_records: int = 0
    refused_records: int = 0
    accepted_ids: list[str] = field(default_factory=list)  # one per 202 batch: its prefix
    retry_after: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    peak_concurrency: int = 0

    def summary(self) -> dict[str, object]:
        ra = sorted(self.retry_after)
        return {
            "seconds": round(self.seconds, 1),
            "requests": dict(self.status),
            "accepted_records": self.accepted_records,
            "refused_records": self.refused_records,
            "accepted_rec_per_s": round(self.accepted_records / max(self.seconds, 1e-9)),
            "retry_after_p50": ra[len(ra) // 2] if ra else None,
            "retry_after_max": ra[-1] if ra else None,
            "errors": dict(self.errors),
            "peak_concurrency": self.peak_concurrency,
        }


def batch_body(tenant: str, prefix: str, n: int) -> bytes:
    lines = [
        orjson.dumps(
            {
                "schema_version": 3,
                "tenant_id": tenant,
                "entity_type": "order",
                "entity_id": f"{prefix}-{i}",
                "revision": 1,
                "occurred_at": occurred_at(i),
                "attributes": {"amount": i + 0.5, "currency": "EUR"},
            }
        )
        for i in range(n)
    ]
    return b"\n".join(lines)


async def run_load(
    url: str,
    *,
    clients: int = 100,
    batch: int = 200,
    seconds: float = 60.0,
    tenants: int = 1,
    prefix: str = "ov",
) -> LoadResult:
    """POST `batch`-record NDJSON bodies from `clients` concurrent clients for `seconds`."""
    result = LoadResult()
    deadline = time.monotonic() + seconds
    in_flight = 0

    async def client(c: int, session: aiohttp.ClientSession) -> None:
        nonlocal in_flight
        tenant = f"load-{c % tenants}" if tenants > 1 else "acme-corp"
        b = 0
        while time.monotonic() < deadline:
            pfx = f"{prefix}-c{c}-b{b}"
            body = batch_body(tenant, pfx, batch)
            in_flight += 1
            result.peak_concurrency = max(result.peak_concurrency, in_flight)
            try:
                async with session.post(
                    f"{url}/v1/webhooks/{tenant}/load",
                    data=body,
                    headers=sign_headers(tenant, body, content_type="application/x-ndjson"),
                ) as resp:
                    await resp.read()
                    status = resp.status
                    retry = resp.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.1)
                continue
            finally:
                in_flight -= 1
            result.status[status] += 1
            if status == 202:
                result.accepted_records += batch
                result.accepted_ids.append(pfx)
                b += 1
            else:
                result.refused_records += batch
                b += 1  # the refused batch is the excess: never sent again
                wait = float(retry) if retry else 1.0
                result.retry_after.append(wait)
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))

    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=clients, keepalive_timeout=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.monotonic()
        await asyncio.gather(*(client(c, session) for c in range(clients)))
        result.seconds = time.monotonic() - t0
    return result
