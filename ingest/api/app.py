"""HTTP: health, metrics, admin controls and the webhook intake.

Every answer that is not a success is JSON with an `error` (short code) and a `reason`
(a sentence an operator or a sender can act on); no traceback ever reaches a client.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.api.auth import Gate, peer
from ingest.api.responses import error, json_response
from ingest.auth.credentials import Role
from ingest.errors import StoreUnavailable
from ingest.metrics import Metrics
from ingest.pipeline.control import ControlFollower
from ingest.webhook.http import WebhookHost, receive

log = logging.getLogger(__name__)


class ServiceHost(WebhookHost, Protocol):
    """What the HTTP layer needs from the running service (`ingest.service.Service`): the
    webhook door's needs (`ingest.webhook.http.WebhookHost`) and health, metrics, admin."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def control(self) -> ControlFollower:
        """This process's follower of the fleet's control record (what /admin/* writes)."""
        ...

    @property
    def worker(self) -> str:
        """This process's identity (host-pid), named in the control record's `updated_by`."""
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

    def refresh_gauges(self) -> None: ...


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
        twice = sorted(
            {k for k in request.query_params if len(request.query_params.getlist(k)) > 1}
        )
        if twice:  # `?rate=0.1&rate=0.5` took the last one without a word
            return error(
                400, "repeated_parameter", f"/admin/{action} takes {', '.join(twice)} once"
            )
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
        rate: float | None = None
        if action == "brownout":
            parsed = _parse_rate(params.get("rate"))
            if isinstance(parsed, Response):
                return parsed
            rate = service.config.admission.brownout_rate if parsed is None else parsed
        elif action not in ("drain", "pause", "resume"):
            return error(
                404,
                "unknown_action",
                f"no admin action '{action}'; use drain, pause, resume or brownout",
            )
        try:  # the fleet's record first: every pod follows it, this one at once
            rec = await service.control.submit(action, rate=rate, who=_who(request, who, service))
        except StoreUnavailable as exc:
            return error(
                503,
                "control_store_unavailable",
                f"cannot write the fleet's control record ({exc}); nothing was changed on any "
                "pod. Retry when the store answers (GET /health/detailed shows .control)",
                headers={"Retry-After": "5"},
            )
        log.warning(
            "admin %s by %s: backpressure %s -> %s (fleet control version %d)",
            action, rec.updated_by, previous, adm.state.value, rec.version,
        )  # fmt: skip
        return json_response(
            {
                "action": action,
                "previous_state": previous,
                "state": adm.state.value,
                "backpressure": adm.snapshot(),
                "control": service.control.snapshot()["desired"],
            }
        )

    async def webhook(request: Request) -> Response:
        return await receive(service, gate, request)

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
        path = request.url.path
        if path != "/" and path.endswith("/"):  # Starlette answered 307 with an empty body
            return error(
                exc.status_code,
                "not_found",
                f"no endpoint {path}: drop the trailing slash ({path.rstrip('/') or '/'})",
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
            peer(request) or "?",
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
    door: Route | None = None
    if part != "admin":
        door = Route("/v1/webhooks/{tenant}/{source}", webhook, methods=["POST"])
        routes.append(door)

    async def webhook_asgi(scope: Scope, receive: Receive, send: Send) -> None:
        """`webhook` as Starlette's layers would run it (its exception middlewares' handlers
        and re-raise, the same `Request` for the endpoint and the handler)."""
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        request = Request(scope, receive, sender)
        try:
            try:
                response = await webhook(request)
                await response(scope, receive, sender)
            except ClientDisconnect as exc:
                if started:
                    raise RuntimeError(
                        "Caught handled exception, but response already started."
                    ) from exc
                await (await disconnected(request, exc))(scope, receive, sender)
        except Exception as exc:
            response = await server_error(Request(scope), exc)
            if not started:
                await response(scope, receive, send)
            raise exc

    app = _App(
        routes=routes,
        exception_handlers={
            HTTPException: not_found,
            ClientDisconnect: disconnected,
            Exception: server_error,
        },
    )
    app.door = (door, webhook_asgi) if door is not None else None
    # `curl -X POST .../admin/resume/` got 307 and an empty body: curl without -L followed
    # nothing, printed nothing and exited 0, and the service stayed drained. A 404 that says
    # what to drop instead.
    app.router.redirect_slashes = False
    return app


class _App(Starlette):
    """The app, with `POST /v1/webhooks/{tenant}/{source}` taken before Starlette's layers.

    Why: the door is the one route under load (every webhook body), and Starlette's two
    exception middlewares, its router's walk over every route and the endpoint wrapper cost
    ~16 us a request on this host, as much as reading its body (docs/benchmarks.md,
    ctlloop2). The route's own regex and convertors match it, so a path that the router
    would give another route, or another method (405), still goes through Starlette."""

    door: tuple[Route, ASGIApp] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        door = self.door
        if (
            door is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and not scope.get("root_path")
            and not self.user_middleware  # one added later must see the door's requests too
        ):
            route, endpoint = door
            match = route.path_regex.match(scope["path"])
            if match is not None:
                scope["app"] = self
                scope.setdefault("router", self.router)
                scope["endpoint"] = route.endpoint
                scope["path_params"] = {
                    k: route.param_convertors[k].convert(v) for k, v in match.groupdict().items()
                }
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _who(request: Request, identity: Any, service: ServiceHost) -> str:
    """For the control record: the caller (its identity and address), and this pod."""
    host = request.client.host if request.client is not None else "unknown"
    return f"{getattr(identity, 'name', 'anonymous')} ({host}) via {service.worker}"


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
