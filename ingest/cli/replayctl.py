"""`replayctl`: the runbook's Replay Operations — plan, approve, run, status, list.

Reads the same config as the service (--config or INGEST_CONFIG; none = embedded SQLite under
./data or INGEST_DATA_DIR), so plans live next to the state the service writes. Every command
takes --json. Exit codes: 0 ok, 1 the run failed or a legal hold blocks it, 2 usage (unknown
plan or source, refused transition), 3 store, source or legal-hold service unreachable,
130 a run was interrupted (run the same command again to resume).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.table import Column, Table
from rich.text import Text

from ingest.cli.common import (
    CLI,
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    StopFlag,
    actor,
    audit_cli,
    err_console,
    fail,
    finite,
    load_existing_state,
    run_async,
    tenant_name,
)
from ingest.config import Config
from ingest.errors import StoreUnavailable
from ingest.replay import plans as P
from ingest.replay import render as V
from ingest.replay import runner as R
from ingest.timefmt import iso
from ingest.tools import console as out

T = TypeVar("T")
EXIT_INTERRUPTED = 130
MAX_RATE = 1e9  # --throttle: records per second
console = out.console()

app = CLI(
    help="Replay plans: plan a window of a tenant's sources, approve it (an RFA for large "
    "replays), run it through the normal pipeline, follow it.\n\nUses the service's config "
    "(--config FILE or INGEST_CONFIG); without one, the embedded SQLite store under ./data "
    "(or INGEST_DATA_DIR).",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Service config file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]
AsOpt = Annotated[
    str | None,
    typer.Option(
        "--as",
        help="Who you are, for the audit trail and the four-eyes rule (default: INGEST_ACTOR, "
        "else the OS user).",
    ),
]


# ------------------------------------------------------------------------------ plumbing


def _emit(doc: Any) -> None:
    print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


def _when(value: str, option: str) -> float:
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        return (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError):
        fail(f"{option} '{value}' is not an ISO date-time like 2025-01-01T00:00:00Z", EXIT_USAGE)


def _config(path: Path | None) -> Config:
    return load_existing_state(path, "replayctl")


def _run(coro: Awaitable[T]) -> T:
    return run_async(coro, (P.PlanError,))


plan_store = P.plan_store


async def _with_store(cfg: Config, fn: Callable[[Any, P.PlanStore], Awaitable[T]]) -> T:
    from ingest.factory import open_stores

    stores = await open_stores(cfg)
    try:
        store = plan_store(stores)
        return await fn(stores, store)
    finally:
        await stores.close()


async def _get(store: P.PlanStore, plan_id: str) -> P.Plan:
    plan = await store.get(plan_id) if P.PLAN_ID.match(plan_id) else None
    if plan is None:
        raise P.PlanError(f"no plan {plan_id}; `replayctl list --tenant <tenant>` shows them")
    return plan


def _threshold(option: int | None) -> int:
    if option is not None:
        return option
    raw = os.environ.get("INGEST_REPLAY_RFA_THRESHOLD")
    if not raw:
        return P.DEFAULT_RFA_THRESHOLD
    try:
        return int(raw)
    except ValueError:
        fail(f"INGEST_REPLAY_RFA_THRESHOLD '{raw}' is not a whole number", EXIT_USAGE)


def _hold_note(plan: P.Plan) -> str:
    if not os.environ.get("INGEST_LEGAL_HOLD_URL"):
        return "no legal-hold service configured"
    return plan.legal_hold or "not checked yet (checked when the plan runs)"


def _doc(plan: P.Plan) -> dict[str, Any]:
    d = plan.to_dict()
    d["window"] = {"from": iso(plan.start), "to": iso(plan.end)}
    d["legal_hold"] = _hold_note(plan)
    d["completion"] = V.completion_doc(plan, time.time())
    return d


# ------------------------------------------------------------------------------ commands


@app.command()
def plan(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant to replay.")],
    start: Annotated[str, typer.Option("--from", help="Window start, ISO (inclusive).")],
    end: Annotated[str, typer.Option("--to", help="Window end, ISO (exclusive).")],
    sources: Annotated[
        str,
        typer.Option(
            "--sources",
            help="Comma-separated: s3, sftp, kafka, inbox-dropped or configured source names.",
        ),
    ],
    throttle: Annotated[
        float,
        typer.Option(
            "--throttle", help=f"Records per second during the run (0.001 to {MAX_RATE:g})."
        ),
    ] = 100.0,
    rto: Annotated[
        str | None,
        typer.Option(
            "--rto",
            help="Recovery time objective, first start to finish: 3600, 90m, 4h, 1h30m "
            "(default: replay.rto_seconds of the config, 4h).",
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    as_: AsOpt = None,
) -> None:
    """Create a plan (pending_approval) with a size estimate; prints its id."""
    tenant_name(tenant)
    throttle = finite(throttle, "--throttle", low=0.001, high=MAX_RATE)
    t0, t1 = _when(start, "--from"), _when(end, "--to")
    if t0 >= t1:
        fail(f"--from {start} must be before --to {end}", EXIT_USAGE)
    try:
        rto_seconds = None if rto is None else V.parse_duration(rto)
    except ValueError as exc:
        fail(f"--rto {exc}", EXIT_USAGE)
    cfg = _config(config)
    try:
        resolved = R.resolve_sources(cfg, tenant, sources.split(","))
    except R.UnknownSource as exc:
        fail(str(exc), EXIT_USAGE)
    new = P.Plan(
        id=P.new_id(),
        tenant=tenant,
        start=t0,
        end=t1,
        sources=resolved,
        throttle=throttle,
        created_at=time.time(),
        created_by=actor(as_),
        rto_seconds=rto_seconds or cfg.replay.rto_seconds,
    )

    async def go(stores: Any, store: P.PlanStore) -> None:
        await R.estimate(cfg, stores, new)
        await store.save(new)
        detail = {
            "from": iso(t0),
            "to": iso(t1),
            "sources": [s.name for s in resolved],
            "throttle": throttle,
            "estimate_records": new.estimate_records,
        }
        await audit_cli(
            stores, new.created_by, "replay.plan", tenant=tenant, target=new.id, detail=detail
        )

    _run(_with_store(cfg, go))
    if json_out:
        _emit(_doc(new))
        return
    console.print(new.id)
    est = new.estimate_records
    console.print(
        f"plan {new.id}: {tenant} {iso(t0)} .. {iso(t1)}, {throttle:g} records/s, "
        f"estimate {'unknown' if est is None else f'{est} records'}; "
        f"state {new.state}. Next: replayctl approve {new.id}"
        + (" --rfa RFA-<number>" if P.needs_rfa(new, _threshold(None)) else "")
    )
    view = P.progress_view(new, time.time())
    needs, rto_s = view.needs_seconds, view.rto_seconds
    if needs is not None and rto_s is not None and needs > rto_s:
        out.styled(
            console,
            "[bold yellow]warning:[/] at {} records/s this replay needs at least {}, more than "
            "its RTO of {}: raise --throttle or split the window",
            f"{throttle:g}",
            V.human(needs),
            V.human(rto_s),
        )
    _estimate_table(new)


@app.command()
def approve(
    plan_id: Annotated[str, typer.Argument(help="Plan id (rp-...).")],
    rfa: Annotated[
        str | None,
        typer.Option("--rfa", help="Request for approval, RFA-<n>: required for large replays."),
    ] = None,
    large_threshold: Annotated[
        int | None,
        typer.Option(
            "--large-threshold", hidden=True, help="Records above which an RFA is needed."
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    as_: AsOpt = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="INGEST_URL",
            help="Approve through the running service with an approver token (INGEST_TOKEN); "
            "the token's name is the approver.",
        ),
    ] = None,
) -> None:
    """Approve a pending plan written by someone else (four eyes; records who and when)."""
    if url:
        p = _approve_remote(url, plan_id, rfa)
    else:
        p = _approve_local(config, plan_id, rfa, large_threshold, actor(as_))
    if json_out:
        _emit(_doc(p))
    else:
        console.print(
            f"plan {p.id} approved by {p.approved_by} at {iso(p.approved_at)}"
            + (f" under {p.rfa}" if p.rfa else "")
            + f". Next: replayctl run "
            f"--plan {p.id}"
        )


def _approve_remote(url: str, plan_id: str, rfa: str | None) -> P.Plan:
    """POST /admin/replay/<id>/approve: the service checks the token's role and scope."""
    from ingest.cli.remote import call

    status, doc = call(
        "POST", url, f"/admin/replay/{plan_id}/approve", params={"rfa": rfa} if rfa else None
    )
    if status == 200:
        return P.Plan.from_dict(doc)
    reason = f"{doc.get('reason') or doc} ({status} {doc.get('error', '')})"
    fail(reason, EXIT_FAILED if status in (401, 403) else EXIT_USAGE)


def _approve_local(
    config: Path | None, plan_id: str, rfa: str | None, large: int | None, who: str
) -> P.Plan:
    cfg = _config(config)
    threshold = _threshold(large)

    async def go(stores: Any, store: P.PlanStore) -> P.Plan:
        p = await _get(store, plan_id)
        detail: dict[str, Any] = {"rfa": rfa, "author": p.created_by}
        try:
            P.approve(p, user=who, rfa=rfa, threshold=threshold, now=time.time())
        except P.PlanError as exc:
            await audit_cli(
                stores,
                who,
                "replay.approve",
                outcome="refused",
                tenant=p.tenant,
                target=p.id,
                detail={**detail, "reason": str(exc)},
            )
            raise
        await store.save(p)
        await audit_cli(stores, who, "replay.approve", tenant=p.tenant, target=p.id, detail=detail)
        return p

    return _run(_with_store(cfg, go))


@app.command("run")
def run_cmd(
    plan_id: Annotated[str, typer.Option("--plan", help="Plan id (rp-...).")],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    as_: AsOpt = None,
) -> None:
    """Run (or resume) an approved plan through decode and delivery at its throttle."""
    cfg = _config(config)
    code, p = _run(_replay(cfg, plan_id, json_out=json_out, who=actor(as_)))
    if json_out:
        _emit(_doc(p))
    else:
        _status(p)
    raise typer.Exit(code)


async def _replay(cfg: Config, plan_id: str, *, json_out: bool, who: str) -> tuple[int, P.Plan]:
    """Run the plan between two audit rows: replay.run.start once it may run, and
    replay.run.end with the outcome (refused, failed, interrupted, ok) in any case."""
    from ingest.factory import build_core

    core = await build_core(cfg)
    try:
        store = plan_store(core.stores)
        p = await _get(store, plan_id)
        plan = p

        async def started() -> None:
            await audit_cli(
                core.stores,
                who,
                "replay.run.start",
                tenant=plan.tenant,
                target=plan.id,
                detail={"state": plan.state},
            )

        outcome = "failed"
        try:
            code, p = await _replay_plan(core, store, p, json_out=json_out, started=started)
            outcome = {0: "ok", EXIT_INTERRUPTED: "interrupted"}.get(code, "refused")
            return code, p
        except P.PlanError:
            outcome = "refused"
            raise
        finally:
            detail = {"state": p.state, "records_done": p.records_done(), "error": p.last_error}
            with contextlib.suppress(Exception):
                await audit_cli(
                    core.stores,
                    who,
                    "replay.run.end",
                    outcome=outcome,
                    tenant=p.tenant,
                    target=p.id,
                    detail=detail,
                )
    finally:
        await core.close()


async def _replay_plan(
    core: Any,
    store: P.PlanStore,
    p: P.Plan,
    *,
    json_out: bool,
    started: Callable[[], Awaitable[None]],
) -> tuple[int, P.Plan]:
    """Legal hold, then the run; returns the exit code and the plan as it ended."""
    if p.state not in P.RUNNABLE:
        P.start(p, time.time())  # raises the reason it cannot
    await started()
    url = os.environ.get("INGEST_LEGAL_HOLD_URL")
    try:
        hold = await R.check_legal_hold(url, p.tenant)
    except Exception as exc:
        p.last_error = f"legal-hold service at {url} unreachable: {exc or type(exc).__name__}"
        await store.save(p)
        fail(f"{p.last_error}; not running plan {p.id}", EXIT_UNAVAILABLE)
    if hold.blocked:
        P.block(p, hold.note)
        await store.save(p)
        err = f"refusing to run plan {p.id}: {hold.note} (state {P.BLOCKED})"
        return _refused(err, json_out), p
    p.legal_hold = hold.note
    await core.start_sinks()
    stop = StopFlag()
    try:
        with stop.installed(), _progress(p, enabled=not json_out) as advance:
            done = await R.run(core, p, store, on_batch=advance, should_stop=stop.is_set)
    except (StoreUnavailable, P.PlanError):
        raise
    except Exception as exc:  # a source failed: in words, in the plan, resumable
        from ingest.sources.objects import SourceFailure

        unreachable = isinstance(exc, OSError) or (
            isinstance(exc, SourceFailure) and exc.unreachable
        )
        msg = f"plan {p.id} failed: {p.last_error}; fix it and run again to resume"
        fail(msg, EXIT_UNAVAILABLE if unreachable else EXIT_FAILED)
    return (0 if done else EXIT_INTERRUPTED), p


def _refused(message: str, json_out: bool) -> int:
    if not json_out:
        out.styled(out.console(stderr=True), "[bold red]error:[/] {}", message)
    return EXIT_FAILED


@contextlib.contextmanager
def _progress(p: P.Plan, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (total = the estimate, when known)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    if not enabled:
        yield lambda n: None
        return
    with Progress(
        f"replay {p.id}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=out.console(stderr=True),
    ) as bar:
        task = bar.add_task("replay", total=p.estimate_records, completed=p.records_done())
        yield lambda n: bar.advance(task, n)


@app.command()
def status(
    plan_id: Annotated[str, typer.Argument(help="Plan id (rp-...).")],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """State, window, estimate, approval, progress (bar, ETA, RTO), each source's, errors."""
    cfg = _config(config)
    p = _run(_with_store(cfg, lambda stores, store: _get(store, plan_id)))
    if json_out:
        _emit(_doc(p))
    else:
        _status(p)


def _status(p: P.Plan) -> None:
    est = p.estimate_records
    lines = [
        ("plan", p.id),
        ("state", p.state),
        ("tenant", p.tenant),
        ("window", f"{iso(p.start)} .. {iso(p.end)}"),
        ("sources", ", ".join(s.name for s in p.sources)),
        ("throttle", f"{p.throttle:g} records/s"),
        ("estimate", "unknown" if est is None else f"{est} records"),
        ("created", f"{iso(p.created_at)} by {p.created_by}"),
        (
            "approval",
            "not approved"
            if p.approved_by is None
            else f"{p.approved_by} at {iso(p.approved_at)}" + (f" ({p.rfa})" if p.rfa else ""),
        ),
        ("started", iso(p.started_at) or "-"),
        ("finished", iso(p.finished_at) or "-"),
        ("records done", str(p.records_done())),
        ("legal hold", _hold_note(p)),
        ("last error", p.last_error or "-"),
    ]
    for k, v in lines:
        out.styled(console, "[bold]{}[/]  {}", f"{k:>13}", v)
    console.print(V.completion(p, time.time()))
    _estimate_table(p)


def _estimate_table(p: P.Plan) -> None:
    table = Table(
        "source", "kind", "estimate", "read", "delivered", "duplicate", "dlq", "position", "done"
    )
    for s in p.sources:
        pr = p.progress.get(s.name, P.Progress())
        est = "unknown" if s.estimate_records is None else str(s.estimate_records)
        if s.estimate_objects is not None:
            est += f" ({s.estimate_objects} objects, {s.estimate_bytes} bytes)"
        pos = (
            f"{len(pr.items_done)} items"
            + (f", {pr.current_item}@{pr.current_offset}" if pr.current_item else "")
            if s.kind in R.OBJECT_KINDS
            else ", ".join(f"{k}={v}" for k, v in pr.offsets.items()) or "-"
        )
        table.add_row(
            s.name,
            s.kind,
            est,
            str(pr.read),
            str(pr.delivered),
            str(pr.duplicate),
            str(pr.dlq),
            pos,
            "yes" if pr.done else "no",
        )
    console.print(table)


@app.command("list")
def list_cmd(
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="Tenant (default: all).")
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Plans, newest first: id, state, window, sources, created, records done, progress."""
    tenant_name(tenant)  # as `plan` and every dlqtriage command: 'Acme Corp' is exit 2
    cfg = _config(config)
    found = _run(_with_store(cfg, lambda stores, store: store.list(tenant)))
    if json_out:
        _emit([_doc(p) for p in found])
        return
    if not found:  # an empty table alone did not say whether the tenant was mistyped
        err_console.print(
            "no replay plans"
            + (f" of tenant '{tenant}'" if tenant else "")
            + " in this store; `replayctl plan` creates one"
        )
    table = Table("tenant", "state", "window", "sources", "created", "records done", "progress")
    table.columns.insert(0, Column("id", no_wrap=True))
    now = time.time()
    for p in found:
        ratio = P.progress_ratio(p)
        table.add_row(
            p.id,
            p.tenant,
            p.state,
            f"{iso(p.start)} .. {iso(p.end)}",
            ",".join(s.name for s in p.sources),
            iso(p.created_at) or "",
            str(p.records_done()),
            Text("-" if ratio is None else f"{100 * ratio:.0f}%").append(
                " RTO at risk" if P.progress_view(p, now).at_risk else "", style="red"
            ),
        )
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
