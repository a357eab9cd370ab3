"""HTTP: health, metrics, admin controls and the webhook intake.

Every answer that is not a success is JSON with an `error` (short code) and a `reason`
(a sentence an operator or a sender can act on); no traceback ever reaches a client.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ingest.api.auth import Gate
from ingest.api.body import BodyTooLarge, BodyTooSlow, read_body
from ingest.auth.credentials import Role
from ingest.config import Config
from ingest.errors import DiskFull, StoreUnavailable, is_disk_full
from ingest.metrics import Metrics
from ingest.names import NAME_RULE
from ingest.pipeline.admission import Admission, BackpressureState, Rejected
from ingest.sources.base import Intake

log = logging.getLogger(__name__)
_NAME = NAME_RULE
_NDJSON_TYPES = (
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/json-seq",
    "text/plain",
)


class ServiceHost(Protocol):
    """What the HTTP layer needs from the running service (`ingest.service.Service`)."""

    @property
    def config(self) -> Config: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def admission(self) -> Admission: ...

    @property
    def intake(self) -> Intake | None:
        """Where webhook bodies are made durable; None when no webhook source is configured."""
        ...

    async def health(self) -> dict[str, Any]:
        """The /health/detailed document."""
        ...

    def live(self) -> tuple[bool, dict[str, Any]]:
        """/health/live: (the event loop turns, the document)."""
        ...

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """/health/ready: (this pod should get traffic, the document with `reasons`)."""
        ...

    def refuse_intake(self, incoming_bytes: int) -> str | None:
        """Why a webhook body of this size is refused for lack of disk space, or None."""
        ...

    def refresh_gauges(self) -> None: ...

    def notify_webhook(self) -> None:
        """A body was appended to the intake: wake its reader."""
        ...


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def error(status: int, code: str, reason: str, **extra: Any) -> Response:
    headers = extra.pop("headers", None)
    return json_response({"error": code, "reason": reason, **extra}, status, headers)


def build_app(
    service: ServiceHost,
    gate: Gate,
    *,
    auth_health: Callable[[], dict[str, Any]] = dict,
    extra_admin: Sequence[Route] = (),
    part: Literal["all", "main", "admin"] = "all",
) -> Starlette:
    """The HTTP app. `gate` decides who may call what (docs/security.md); `part` splits it
    over two listeners when `http.admin_port` is set: "main" without /admin/*, "admin" with
    /admin/* and without webhooks (probes, /metrics and /health/detailed on both)."""

    async def health_detailed(request: Request, who: Any) -> Response:
        return json_response({**await service.health(), "auth": auth_health()})

    async def health_live(request: Request) -> Response:
        ok, body = service.live()
        return json_response(body, 200 if ok else 503)

    async def health_ready(request: Request) -> Response:
        ok, body = service.ready()
        return json_response(body, 200 if ok else 503)

    async def metrics(request: Request) -> Response:
        service.refresh_gauges()  # first: the state as of the request
        fresh = getattr(service, "fresh_reports", None)  # a pod: its workers' figures, now
        if fresh is not None:
            await fresh()
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def admin(request: Request, who: Any) -> Response:
        action = request.path_params["action"]
        params = dict(request.query_params)
        allowed = {"brownout": {"rate"}}.get(action, set())
        unknown = sorted(set(params) - allowed)
        if unknown:
            return error(
                400,
                "unknown_parameter",
                f"/admin/{action} takes no parameter {', '.join(unknown)}"
                + (f" (it takes: {', '.join(sorted(allowed))})" if allowed else ""),
            )
        adm = service.admission
        previous = adm.state.value
        if action == "drain":
            adm.drain()
        elif action == "pause":
            adm.pause()
        elif action == "resume":
            adm.resume()
        elif action == "brownout":
            rate = _parse_rate(params.get("rate"))
            if isinstance(rate, Response):
                return rate
            adm.brownout(rate)
        else:
            return error(
                404,
                "unknown_action",
                f"no admin action '{action}'; use drain, pause, resume or brownout",
            )
        log.warning(
            "admin %s by %s: backpressure %s -> %s", action, who.name, previous, adm.state.value
        )
        return json_response(
            {
                "action": action,
                "previous_state": previous,
                "state": adm.state.value,
                "backpressure": adm.snapshot(),
            }
        )

    async def webhook(request: Request) -> Response:
        return await _webhook(service, gate, request)

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return error(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed on {request.url.path}; use POST"
                if request.url.path.startswith(("/admin", "/v1/webhooks"))
                else f"{request.method} is not allowed on {request.url.path}; use GET",
            )
        return error(
            exc.status_code,
            "not_found",
            f"no endpoint {request.url.path}; see GET /health/detailed, GET /metrics, "
            "POST /admin/{drain,resume,pause,brownout}, POST /v1/webhooks/{tenant}/{source}",
        )

    async def disconnected(request: Request, exc: Exception) -> Response:
        """A client gone mid-request: one log line, no traceback; nothing was accepted."""
        log.info(
            "client %s disconnected during %s %s; nothing was accepted",
            _peer(request),
            request.method,
            request.url.path,
        )
        return error(400, "client_disconnected", "the client closed the connection")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error(500, "internal_error", "the service hit an unexpected error; see its log")

    def action(request: Request) -> str:
        return f"admin.{request.path_params['action']}"

    routes = [
        Route(
            "/health/detailed",
            gate.operator(Role.VIEWER, "health.detailed", health_detailed, audit_ok=False),
            methods=["GET"],
        ),
        Route("/health", health_live, methods=["GET"]),
        Route("/health/live", health_live, methods=["GET"]),
        Route("/health/ready", health_ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    if part != "main":
        routes += [
            *extra_admin,
            Route("/admin/{action}", gate.operator(Role.OPERATOR, action, admin), methods=["POST"]),
        ]
    if part != "admin":
        routes.append(Route("/v1/webhooks/{tenant}/{source}", webhook, methods=["POST"]))
    return Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: not_found,
            ClientDisconnect: disconnected,
            Exception: server_error,
        },
    )


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client is not None else "?"


def _parse_rate(value: str | None) -> float | Response | None:
    if value is None:
        return None
    try:
        rate = float(value)
    except ValueError:
        rate = math.nan
    if not (0 < rate <= 1):
        return error(
            400,
            "invalid_rate",
            f"rate must be a number in (0, 1] (the share of low-priority records kept); "
            f"got '{value}'",
        )
    return rate


async def _webhook(service: ServiceHost, gate: Gate, request: Request) -> Response:
    tenant = request.path_params["tenant"]
    source = request.path_params["source"]
    for what, value in (("tenant", tenant), ("source", source)):
        if not _NAME.match(value):
            return error(400, f"invalid_{what}", f"{what} '{value}' must match {_NAME.pattern}")
    intake = service.intake
    if intake is None:
        return error(404, "webhooks_disabled", "no webhook source is configured")
    check = gate.webhook_headers(tenant, request)  # a credential the headers refuse: 401/403
    if isinstance(check, Response):
        return check
    state = service.admission.state
    if state in (BackpressureState.DRAIN, BackpressureState.PAUSED):
        return error(
            503,
            state.value,
            f"ingest is {'draining' if state is BackpressureState.DRAIN else 'paused'}; "
            "nothing new is accepted until an operator resumes it",
            headers={"Retry-After": "30"},
        )

    try:  # a full intake refuses before the body is read: refusing must stay cheap
        service.admission.check_open()
    except Rejected as rej:
        return _refused(rej)
    declared_size = request.headers.get("content-length", "")
    refused = service.refuse_intake(int(declared_size) if declared_size.isdigit() else 0)
    if refused is not None:  # below the disk's low watermark: the rest is the pipeline's
        return _insufficient_storage(refused)

    limit = service.config.http.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return error(413, "body_too_large", f"body is {declared} bytes; the limit is {limit}")
    http = service.config.http
    try:
        body = await read_body(
            request,
            limit=limit,
            timeout=http.body_timeout_seconds,
            min_rate=http.min_body_bytes_per_second,
            grace=http.body_grace_seconds,
        )
    except BodyTooLarge as exc:
        return error(413, "body_too_large", str(exc))
    except BodyTooSlow as exc:
        log.info("webhook %s/%s from %s: %s", tenant, source, _peer(request), exc)
        return error(408, "request_timeout", str(exc), headers={"Connection": "close"})
    who = await gate.webhook_body(check, body)  # the signature, before anything is stored
    if isinstance(who, Response):
        return who
    response = await _take(service, tenant, source, body, request.headers.get("content-type", ""))
    if response.status_code != 202:
        await gate.release(check)  # not accepted: the sender may send the same request again
    return response


async def _take(
    service: ServiceHost, tenant: str, source: str, body: bytes, content_type: str
) -> Response:
    """Split an authenticated body into records, admit them and make them durable (202)."""
    intake = service.intake
    assert intake is not None
    if not body.strip():
        return error(
            400, "empty_body", "the body is empty; send a JSON object, an array, or NDJSON"
        )

    lines, malformed = _split_records(body, content_type)
    if isinstance(lines, Response):
        return lines
    refused = service.refuse_intake(len(body))
    if refused is not None:
        return _insufficient_storage(refused)

    admission = service.admission
    try:
        await admission.try_admit(tenant, len(lines), len(body))
    except Rejected as rej:
        return _refused(rej)

    try:
        intake_id = await intake.append(tenant, source, lines, time.time())
    except StoreUnavailable as exc:
        admission.appended(len(lines), len(body), ok=False)
        if isinstance(exc, DiskFull) or is_disk_full(exc):
            return _insufficient_storage(f"the data disk is full ({exc.cause})")
        return error(
            503,
            "intake_unavailable",
            f"could not make the body durable ({exc}); nothing was accepted, retry later",
            headers={"Retry-After": "5"},
        )
    except BaseException:
        admission.appended(len(lines), len(body), ok=False)
        raise
    admission.appended(len(lines), len(body), ok=True)
    service.notify_webhook()
    return json_response(
        {
            "status": "accepted",
            "records": len(lines),
            "malformed": malformed,
            "intake_id": intake_id,
            **(
                {
                    "note": "malformed lines are accepted into the DLQ as "
                    "VALIDATION_FAIL; see dlqtriage"
                }
                if malformed
                else {}
            ),
        },
        202,
    )


def _refused(rej: Rejected) -> Response:
    """429 with Retry-After while throttled (tenant rate, full intake); 503 drain/pause."""
    if rej.state is BackpressureState.THROTTLED:
        retry_after = max(1, math.ceil(rej.retry_after or 1))
        return error(
            429,
            "throttled",
            rej.reason,
            retry_after_seconds=retry_after,
            headers={"Retry-After": str(retry_after)},
        )
    return error(503, rej.state.value, rej.reason, headers={"Retry-After": "30"})


def _insufficient_storage(why: str) -> Response:
    return error(
        507,
        "insufficient_storage",
        f"{why}; nothing was accepted, retry later",
        headers={"Retry-After": "30"},
    )


def _split_records(body: bytes, content_type: str) -> tuple[list[bytes] | Response, int]:
    """One JSON value, a JSON array of objects, or NDJSON -> one byte string per record.

    A JSON body that does not parse is refused whole (400). NDJSON is taken line by line: if
    no line parses it is refused (400); otherwise malformed lines are kept, so the pipeline
    DLQs each one with its bytes and the sender can see exactly which.
    """
    ctype = content_type.split(";")[0].strip().lower()
    if ctype not in _NDJSON_TYPES:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if b"\n" in body.strip() and ctype != "application/json":
                return _split_ndjson(body)
            return error(400, "invalid_json", f"body is not JSON: {exc}"), 0
        if isinstance(value, list):
            if not value:
                return error(400, "empty_array", "the JSON array holds no records"), 0
            return [orjson.dumps(v) for v in value], 0
        return [body.strip()], 0
    return _split_ndjson(body)


def _split_ndjson(body: bytes) -> tuple[list[bytes] | Response, int]:
    lines = [ln.strip() for ln in body.splitlines()]
    lines = [ln for ln in lines if ln]
    malformed = 0
    for ln in lines:
        try:
            orjson.loads(ln)
        except orjson.JSONDecodeError:
            malformed += 1
    if malformed == len(lines):
        return error(400, "invalid_json", "no line of the body is JSON (expected NDJSON)"), 0
    return lines, malformed
