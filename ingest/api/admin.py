"""Operator endpoints beyond the backpressure controls: DLQ reads and redrive, replay
approvals, the audit trail. Each answers the same JSON as the CLI's `--json`, needs the role
in docs/security.md, and reads or acts only on the tenants the token may see.

    GET  /admin/dlq/summary?tenant=                        viewer    = dlqtriage summary
    GET  /admin/dlq/sample?tenant=&reason=&limit=&full=    viewer    = dlqtriage sample (audited)
    POST /admin/dlq/redrive?tenant=&reason=&id=&force=     operator  = dlqtriage redrive
    GET  /admin/replay?tenant=                             viewer    = replayctl list
    POST /admin/replay/{plan_id}/approve?rfa=              approver  = replayctl approve
    GET  /admin/audit?actor=&action=&tenant=&since=&limit= viewer    = ingest audit
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingest.api.auth import Gate, answer
from ingest.auth.credentials import Role
from ingest.auth.guard import Identity
from ingest.replay import plans as P
from ingest.state.audit import AuditFilter, audit_store
from ingest.state.base import DLQFilter
from ingest.timefmt import parse_when
from ingest.triage import analyze, render
from ingest.triage.redrive import redrive

MAX_SAMPLE = 1000


class BadRequest(Exception):
    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


def _json(body: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_INDENT_2, default=str),
        status_code=status,
        media_type="application/json",
    )


def _params(request: Request, allowed: set[str]) -> dict[str, list[str]]:
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise BadRequest(
            400,
            "unknown_parameter",
            f"{request.url.path} takes no parameter {', '.join(unknown)} "
            f"(it takes: {', '.join(sorted(allowed)) or 'none'})",
        )
    return {k: request.query_params.getlist(k) for k in allowed if k in request.query_params}


def _one(params: dict[str, list[str]], name: str) -> str | None:
    """A parameter given at most once: `?tenant=a&tenant=b` answered for b without a word."""
    values = params.get(name)
    if values and len(values) > 1:
        raise BadRequest(400, "repeated_parameter", f"{name} is given {len(values)} times; once")
    return values[0] if values else None


def _int(params: dict[str, list[str]], name: str, default: int, top: int) -> int:
    raw = _one(params, name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= top:
        raise BadRequest(400, f"invalid_{name}", f"{name} must be a whole number in 1..{top}")
    return int(raw)


def _scope(who: Identity, tenant: str | None) -> None:
    if not who.sees(tenant):
        scope = ", ".join(sorted(who.tenants))
        raise BadRequest(
            403,
            "tenant_scope",
            f"token '{who.name}' may act on tenants {scope} only"
            + ("; name one with ?tenant=" if tenant is None else f", not '{tenant}'"),
        )


def _reasons(params: dict[str, list[str]]) -> list[Any]:
    try:
        return [analyze.parse_reason(r) for r in params.get("reason", [])]
    except analyze.UnknownReason as exc:
        raise BadRequest(400, "unknown_reason", str(exc)) from None


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_when(value).timestamp()
    except ValueError as exc:
        raise BadRequest(400, "invalid_since", f"since {exc}") from None


Handler = Callable[[Request, Identity], Awaitable[Response]]


def _handled(fn: Handler) -> Handler:
    async def run(request: Request, who: Identity) -> Response:
        try:
            return await fn(request, who)
        except BadRequest as exc:
            return answer(exc.status, exc.code, exc.reason)

    return run


def routes(stores: Any, core: Callable[[], Awaitable[Any]], gate: Gate) -> list[Route]:
    """`stores`: the state stores (factory `Stores`); `core()`: the Core a redrive delivers
    through (the service's, or one the pod's control plane builds on first use)."""

    async def dlq_summary(request: Request, who: Identity) -> Response:
        tenant = _one(_params(request, {"tenant"}), "tenant")
        _scope(who, tenant)
        flt = DLQFilter(tenant=tenant)
        groups = await stores.dlq.groups(flt)
        # records counted once however many sinks each failed at, as `dlqtriage summary` does
        # (without it a record failing at two sinks was two records: a DLQ rate twice too high)
        result = analyze.summarize(
            groups, await stores.dlq.processed_total(tenant), await stores.dlq.count_records(flt)
        )
        return _json({"tenant": tenant, **result.as_dict()})

    async def dlq_sample(request: Request, who: Identity) -> Response:
        params = _params(request, {"tenant", "reason", "limit", "full"})
        tenant = _one(params, "tenant")
        _scope(who, tenant)
        limit = _int(params, "limit", 10, MAX_SAMPLE)
        flt = DLQFilter(tenant=tenant, reasons=_reasons(params))
        out: list[Any] = []
        async for page in stores.dlq.scan(flt, min(limit, 500)):
            out.extend(page[: limit - len(out)])
            if len(out) >= limit:
                break
        full = _one(params, "full") in ("1", "true", "yes")
        return _json([render.entry_dict(e, full) for e in out])

    async def dlq_redrive(request: Request, who: Identity) -> Response:
        params = _params(request, {"tenant", "reason", "id", "force"})
        tenant = _one(params, "tenant")
        _scope(who, tenant)
        reasons = _reasons(params)
        ids = params.get("id", [])
        if not reasons and not ids:
            raise BadRequest(400, "missing_filter", "say what to redrive: reason= and/or id=")
        if not all(i.isdigit() for i in ids):
            raise BadRequest(400, "invalid_id", "id must be a whole number")
        flt = DLQFilter(tenant=tenant, reasons=reasons, ids=[int(i) for i in ids])
        groups = await stores.dlq.groups(flt)
        why = analyze.refusal({*reasons, *(g.reason for g in groups)})
        if why and _one(params, "force") not in ("1", "true", "yes"):
            raise BadRequest(409, "needs_force", f"refusing to redrive: {why} (force=1)")
        result = await redrive(await core(), flt)
        return _json(result.as_dict())

    async def replay_list(request: Request, who: Identity) -> Response:
        tenant = _one(_params(request, {"tenant"}), "tenant")
        _scope(who, tenant)
        store = await _plans(stores)
        return _json([p.to_dict() for p in await store.list(tenant)])

    async def replay_approve(request: Request, who: Identity) -> Response:
        rfa = _one(_params(request, {"rfa"}), "rfa")
        plan_id = request.path_params["plan_id"]
        store = await _plans(stores)
        plan = await store.get(plan_id) if P.PLAN_ID.match(plan_id) else None
        if plan is None:
            raise BadRequest(404, "unknown_plan", f"no plan {plan_id}")
        _scope(who, plan.tenant)
        threshold = int(os.environ.get("INGEST_REPLAY_RFA_THRESHOLD") or P.DEFAULT_RFA_THRESHOLD)
        try:
            P.approve(plan, user=who.name, rfa=rfa, threshold=threshold, now=time.time())
        except P.PlanError as exc:
            raise BadRequest(409, "approval_refused", str(exc)) from None
        await store.save(plan)
        return _json(plan.to_dict())

    async def audit(request: Request, who: Identity) -> Response:
        params = _params(request, {"actor", "action", "tenant", "since", "limit"})
        tenant = _one(params, "tenant")
        _scope(who, tenant)
        flt = AuditFilter(
            since=_since(_one(params, "since")),
            actor=_one(params, "actor"),
            action=_one(params, "action"),
            tenant=tenant,
            limit=_int(params, "limit", 100, 10_000),
        )
        return _json([e.to_dict() for e in await audit_store(stores).query(flt)])

    def op(role: Role, action: str, fn: Handler, audit_ok: bool = True) -> Any:
        return gate.operator(role, action, _handled(fn), every_tenant=False, audit_ok=audit_ok)

    return [
        Route(
            "/admin/dlq/summary",
            op(Role.VIEWER, "dlq.summary", dlq_summary, False),
            methods=["GET"],
        ),
        Route("/admin/dlq/sample", op(Role.VIEWER, "dlq.sample", dlq_sample), methods=["GET"]),
        Route(
            "/admin/dlq/redrive", op(Role.OPERATOR, "dlq.redrive", dlq_redrive), methods=["POST"]
        ),
        Route("/admin/replay", op(Role.VIEWER, "replay.list", replay_list, False), methods=["GET"]),
        Route(
            "/admin/replay/{plan_id}/approve",
            op(Role.APPROVER, "replay.approve", replay_approve),
            methods=["POST"],
        ),
        Route("/admin/audit", op(Role.VIEWER, "audit.read", audit, False), methods=["GET"]),
    ]


async def _plans(stores: Any) -> P.PlanStore:
    return P.plan_store(stores)
