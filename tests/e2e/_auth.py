"""Credentials for tests that drive the service: operator tokens per role, tenant signatures.

One set per test session. `ServiceProcess` writes them into its data dir and points the
service at them (INGEST_CREDENTIALS_FILE), so every tenant can sign (its secret is derived
from the session's tenant secret key) and every role has a token:

    headers = sign_headers("acme-corp", body)            # X-Ingest-Signature for that body
    httpx.post(url, content=body, headers=headers)
    httpx.post(f"{url}/admin/drain", headers=bearer("operator"))
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
from pydantic import SecretStr

from ingest.auth import credentials as C
from ingest.auth import signing

TENANT_KEY = C.new_secret(C.MASTER_PREFIX)
ROLES: dict[str, list[str]] = {
    "admin": ["viewer", "operator", "approver"],
    "viewer": ["viewer"],
    "operator": ["operator"],
    "approver": ["approver"],
}
TOKENS: dict[str, str] = {role: C.new_token() for role in ROLES}
CREDENTIALS_FILE = "test-credentials.yaml"


def credentials() -> C.Credentials:
    tokens = [
        C.TokenEntry(
            name=f"test-{role}", roles=[C.Role(r) for r in roles], sha256=C.sha256_hex(TOKENS[role])
        )
        for role, roles in ROLES.items()
    ]
    return C.Credentials(tokens=tokens, tenant_secret_keys=[SecretStr(TENANT_KEY)])


def write_credentials(directory: Path) -> Path:
    path = directory / CREDENTIALS_FILE
    C.write_private(path, C.dump(credentials()))
    return path


def tenant_secret(tenant: str) -> str:
    return C.derive_secret(TENANT_KEY, tenant)


def sign_headers(
    tenant: str,
    body: bytes | str,
    *,
    timestamp: int | None = None,
    content_type: str | None = "application/json",
) -> dict[str, str]:
    """Headers that authenticate `body` as tenant `tenant` (sign the exact bytes you send).
    Each call is a new delivery: the same body signed twice gets two different `t`."""
    raw = body.encode() if isinstance(body, str) else body
    ts = _fresh_second(tenant, raw) if timestamp is None else timestamp
    headers = {signing.HEADER: signing.header_value([tenant_secret(tenant)], raw, timestamp=ts)}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers


_signed: dict[tuple[str, bytes, int], None] = {}


def _fresh_second(tenant: str, body: bytes) -> int:
    """Now, or a second earlier when this exact body was already signed for this tenant at
    that second: the service refuses an exact replay (same tenant, t and body), and a test
    that sends the same body twice means two deliveries, as a sender re-signing would."""
    now = int(time.time())
    digest = hashlib.sha256(body).digest()
    ts = now
    while (tenant, digest, ts) in _signed:
        ts -= 1
    if len(_signed) > 100_000:
        _signed.clear()
    _signed[(tenant, digest, ts)] = None
    return ts


def bearer(role: str = "admin") -> dict[str, str]:
    """`Authorization: Bearer <token>` of the session's token with that role."""
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def service_env(directory: Path) -> dict[str, str]:
    """Environment for an `ingest run` started by hand (benchmarks): the session's credentials
    written into `directory`, and the operator token for CLIs (INGEST_TOKEN)."""
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "INGEST_CREDENTIALS_FILE": str(write_credentials(directory)),
        "INGEST_TOKEN": TOKENS["admin"],
    }


def detailed(url: str, timeout: float = 10) -> httpx.Response:
    """GET <url>/health/detailed as a viewer (the session's all-roles token)."""
    return httpx.get(f"{url}/health/detailed", headers=bearer(), timeout=timeout)
