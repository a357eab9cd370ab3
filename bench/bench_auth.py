"""What authenticating a webhook costs: the guard's checks per signed request, in process.

    uv run python bench/bench_auth.py [--requests 5000] [--body-bytes 1024]

Per request: header parse, timestamp window, HMAC-SHA256 over the body with each of the
tenant's two active secrets, the replay reservation (memory, and the embedded SQLite table the
service uses). Prints requests/s, p95 per request, peak memory, and the ratio against the
physical limit measured in the same run: hashlib's HMAC-SHA256 alone over the same bodies
(two per request, as the guard computes).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ingest.auth import credentials as C  # noqa: E402
from ingest.auth import signing  # noqa: E402
from ingest.auth.guard import Guard, Identity  # noqa: E402
from ingest.auth.seen import MemorySeen, SeenSignatures, SQLiteSeen  # noqa: E402
from ingest.state.sqlite import SQLiteDB  # noqa: E402

SECRETS = ["whsec_old-0123456789abcdef0123", "whsec_new-0123456789abcdef0123"]


def p95(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.95)]


async def run(
    seen: SeenSignatures, bodies: list[bytes], headers: list[dict[str, str]]
) -> list[float]:
    creds = C.Credentials.model_validate({"tenants": {"acme-corp": {"secrets": SECRETS}}})
    guard = Guard(C.CredentialSource(creds), seen)
    took = []
    for body, h in zip(bodies, headers, strict=True):
        t0 = time.perf_counter()
        check = guard.webhook_headers("acme-corp", h)
        assert not isinstance(check, Identity)
        who = await guard.webhook_body(check, body)  # type: ignore[arg-type]
        took.append(time.perf_counter() - t0)
        assert isinstance(who, Identity), who
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--body-bytes", type=int, default=1024)
    args = ap.parse_args()
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}"
        f", load average {os.getloadavg()}"
    )
    n = args.requests
    bodies = [os.urandom(args.body_bytes // 2).hex().encode()[: args.body_bytes] for _ in range(n)]
    now = int(time.time())
    headers = [
        {signing.HEADER.lower(): signing.header_value(SECRETS[1:], b, timestamp=now)}
        for b in bodies
    ]
    t0 = time.perf_counter()
    for b in bodies:
        for s in SECRETS:
            hmac.new(s.encode(), b"%d." % now + b, hashlib.sha256).hexdigest()
    limit = n / (time.perf_counter() - t0)
    print(f"physical limit (2 x HMAC-SHA256 per request, hashlib): {limit:,.0f} requests/s")

    async def both() -> None:
        db = await SQLiteDB.open(Path(tempfile.mkdtemp()) / "state.db")
        try:
            for name, seen in (("memory", MemorySeen()), ("sqlite", SQLiteSeen(db))):
                t = time.perf_counter()
                took = await run(seen, bodies, headers)
                rate = n / (time.perf_counter() - t)
                print(
                    f"guard, replay cache in {name}: {rate:,.0f} requests/s, "
                    f"p95 {p95(took) * 1e6:.0f} us, ratio to the limit {rate / limit:.2f}"
                )
        finally:
            await db.close()

    asyncio.run(both())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory: {peak:.0f} MB")


if __name__ == "__main__":
    main()
