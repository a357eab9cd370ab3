"""CLIs talking to a running service: one HTTP call with the operator token (INGEST_TOKEN).

These follow the service's roles (docs/security.md); the stdlib client keeps the CLIs free of
another dependency. Answers come back as (status, JSON document); an unreachable service
exits 3 like an unreachable store.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

from ingest.cli.common import EXIT_UNAVAILABLE, EXIT_USAGE, fail

DEFAULT_URL = "http://127.0.0.1:8080"


def call(
    method: str,
    url: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    token: str | None = None,
    operator: bool = True,
) -> tuple[int, Any]:
    """`method url+path?params`; for an operator call the token (else INGEST_TOKEN) goes as a
    bearer. Webhook posts (`operator=False`) never send an operator token."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    endpoint = f"{url.rstrip('/')}{path}{query}"
    all_headers = dict(headers or {})
    token = token or os.environ.get("INGEST_TOKEN")
    if operator and token and "Authorization" not in all_headers:
        all_headers["Authorization"] = f"Bearer {token}"
    try:  # Request() itself refuses a URL it cannot parse (ValueError, below)
        request = urllib.request.Request(endpoint, data=body, headers=all_headers, method=method)
        with urllib.request.urlopen(request, timeout=60) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except ValueError as exc:  # not a URL urllib understands
        fail(f"--url {url}: {exc}", EXIT_USAGE)
    except (urllib.error.URLError, OSError) as exc:
        fail(f"cannot reach {endpoint}: {getattr(exc, 'reason', exc)}", EXIT_UNAVAILABLE)
    try:
        return status, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return status, {"error": "not_json", "reason": raw.decode(errors="replace")[:500]}
