"""JSON answers of the HTTP layer: every answer that is not a success is `{error, reason}`."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def error(status: int, code: str, reason: str, **extra: Any) -> Response:
    """`{"error": code, "reason": reason, ...}`: a short code and a sentence to act on."""
    headers = extra.pop("headers", None)
    return json_response({"error": code, "reason": reason, **extra}, status, headers)
