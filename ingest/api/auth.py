"""The HTTP side of the guard: refusals as JSON answers, operator routes by role, audit rows.

`Gate.operator(role, action, handler)` wraps an operator endpoint: no valid token, no call
(401/403 before the handler runs); a valid token's call is answered by the handler and then
appended to the audit trail with its outcome (a 403 for a missing role is audited as
`denied`). Webhooks call `Gate.webhook_headers` before reading the body and
`Gate.webhook_body` before storing it; `Gate.release` when the body is then not accepted.
Requests without a valid credential are counted in `ingest_auth_failures_total`, not audited,
so they cannot fill the audit table.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ingest.auth.credentials import Role
from ingest.auth.guard import Guard, Identity, Refusal, WebhookCheck
from ingest.errors import StoreUnavailable
from ingest.metrics import Metrics
from ingest.state.audit import DENIED, FAILED, OK, REFUSED, AuditEntry, AuditStore

log = logging.getLogger(__name__)
Handler = Callable[[Request, Identity], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


def answer(status: int, code: str, reason: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": code, "reason": reason}, option=orjson.OPT_INDENT_2)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def refusal(r: Refusal) -> Response:
    return answer(r.status, r.error, r.reason, r.headers)


def peer(request: Request) -> str:
    """The TCP peer (a proxy's address behind one; forwarded headers are not trusted)."""
    client = request.client
    return f"{client.host}:{client.port}" if client else ""


def _outcome(status: int) -> str:
    if status < 400:
        return OK
    if status == 403:
        return DENIED
    return FAILED if status >= 500 else REFUSED


class Gate:
    def __init__(self, guard: Guard, audit: AuditStore | None, metrics: Metrics) -> None:
        self.guard = guard
        self.audit = audit
        self.metrics = metrics

    def _failed(self, surface: str, r: Refusal) -> Response:
        self.metrics.auth_failures.labels(surface, r.error).inc()
        return refusal(r)

    # ------------------------------------------------------------------ operators
    def operator(
        self,
        role: Role,
        action: str | Callable[[Request], str],
        handler: Handler,
        *,
        every_tenant: bool = True,
        audit_ok: bool = True,
    ) -> Endpoint:
        """An endpoint that needs `role`; `action` names it in the audit trail. Denials (403)
        are always audited, answered calls unless `audit_ok` is False (frequent reads like
        /health/detailed). `every_tenant`: it acts on all tenants at once (drain, health), so
        a token scoped to some tenants gets 403 `tenant_scope`; endpoints about one tenant
        check the scope themselves."""

        async def endpoint(request: Request) -> Response:
            name = action(request) if callable(action) else action
            who = self.guard.admin(request.headers.get("authorization"), role)
            if not isinstance(who, Refusal) and every_tenant and not who.sees(None):
                who = Refusal(
                    403,
                    "tenant_scope",
                    f"token '{who.name}' is limited to tenants "
                    f"{', '.join(sorted(who.tenants))}; this endpoint acts on all tenants",
                    actor=who.name,
                )
            if isinstance(who, Refusal):
                response = self._failed("admin", who)
                if who.status == 403 and who.actor:
                    await self.record(request, Identity(who.actor, "token"), name, response)
                return response
            response = await handler(request, who)
            if audit_ok or response.status_code == 403:
                await self.record(request, who, name, response)
            return response

        return endpoint

    async def record(
        self, request: Request, who: Identity, action: str, response: Response
    ) -> None:
        if self.audit is None:
            return
        detail: dict[str, Any] = {"status": response.status_code}
        if request.query_params:
            detail["params"] = dict(request.query_params)
        if response.status_code >= 400:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                detail["error"] = orjson.loads(bytes(response.body)).get("error")
        entry = AuditEntry(
            at=time.time(),
            actor=who.name,
            via=who.via,
            action=action,
            outcome=_outcome(response.status_code),
            remote=peer(request),
            tenant=request.query_params.get("tenant") or request.path_params.get("tenant"),
            target=request.path_params.get("plan_id", ""),
            detail=detail,
        )
        try:
            await self.audit.record(entry)
        except Exception as exc:  # the action happened: keep it in the log, never lose it
            self.metrics.audit_failures.inc()
            log.error("audit row not stored (%s): %s", exc, orjson.dumps(entry.to_dict()).decode())

    # ------------------------------------------------------------------ webhooks
    def webhook_headers(self, tenant: str, request: Request) -> WebhookCheck | Response:
        check = self.guard.webhook_headers(tenant, request.headers)
        return self._failed("webhook", check) if isinstance(check, Refusal) else check

    async def webhook_body(self, check: WebhookCheck, body: bytes) -> Identity | Response:
        try:
            who = await self.guard.webhook_body(check, body)
        except StoreUnavailable as exc:
            return answer(
                503,
                "auth_unavailable",
                f"cannot check the signature against replays ({exc}); nothing was accepted",
                {"Retry-After": "5"},
            )
        return self._failed("webhook", who) if isinstance(who, Refusal) else who

    async def release(self, check: WebhookCheck) -> None:
        try:
            await self.guard.release(check)
        except StoreUnavailable as exc:  # it expires with the window anyway
            log.warning("could not release a refused webhook's signature: %s", exc)
