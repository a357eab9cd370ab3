"""`dlqtriage`: the runbook's DLQ triage — summary, sample, analyze, redrive, purge.

Reads the same config as the service (--config or INGEST_CONFIG; none = embedded SQLite under
./data or INGEST_DATA_DIR), so it always looks at the store the service writes. Every command
takes --json. Exit codes: 0 ok, 1 some entries failed again (or the run was stopped), 2 usage
(also a --tenant that is not a tenant name; one unknown to the store only warns),
3 store or sink unreachable; 130 when a redrive was interrupted (safe to run again).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

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
    parse_when,
    run_async,
    tenant_name,
)
from ingest.config import Config
from ingest.records import DLQEntry, ReasonCode
from ingest.state.base import DLQFilter, DLQStore
from ingest.triage import analyze, render

T = TypeVar("T")
EXIT_INTERRUPTED = 130
MAX_DAYS = 36_500  # --older-than: a century is "everything"
MAX_ID = 2**63 - 1  # DLQ ids are 64-bit integers in every store

app = CLI(
    help="DLQ triage: what failed, why, and what to do — then redrive or purge.\n\n"
    "Uses the service's config (--config FILE or INGEST_CONFIG); without one, the embedded "
    "SQLite store under ./data (or INGEST_DATA_DIR).",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Service config file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]
TenantOpt = Annotated[str | None, typer.Option("--tenant", "-t", help="Tenant (default: all).")]
AsOpt = Annotated[
    str | None,
    typer.Option(
        "--as", help="Who you are in the audit trail (default: INGEST_ACTOR, else the OS user)."
    ),
]
ReasonsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--reason", "-r", help="Reason code (repeatable): " + ", ".join(r.value for r in ReasonCode)
    ),
]


# ------------------------------------------------------------------------------ plumbing


def _reasons(values: list[str] | None) -> list[ReasonCode]:
    try:
        return [analyze.parse_reason(v) for v in values or []]
    except analyze.UnknownReason as exc:
        fail(str(exc), EXIT_USAGE)


def _config(path: Path | None) -> Config:
    return load_existing_state(path, "dlqtriage")


def _run(coro: Awaitable[T]) -> T:
    return run_async(coro)


async def _with_stores(cfg: Config, fn: Callable[[Any], Awaitable[T]]) -> T:
    from ingest.factory import open_stores

    stores = await open_stores(cfg)
    try:
        return await fn(stores)
    finally:
        await stores.close()


async def _with_dlq(cfg: Config, fn: Callable[[DLQStore], Awaitable[T]]) -> T:
    return await _with_stores(cfg, lambda stores: fn(stores.dlq))


async def _first(dlq: DLQStore, flt: DLQFilter, limit: int) -> list[DLQEntry]:
    out: list[DLQEntry] = []
    async for page in dlq.scan(flt, max(1, min(limit, 500))):
        out.extend(page[: limit - len(out)])
        if len(out) >= limit:
            break
    return out


def _warn_unknown_tenant(tenant: str) -> None:
    """The one wording for a --tenant this store has never heard of (no DLQ entry, no record
    processed): a typo must not look like "nothing to do" or "clean", yet a tenant that simply
    has no data yet is not an error, so this goes to stderr and the exit code is unchanged."""
    err_console.print(
        f"[bold yellow]warning:[/] no DLQ entry and no processed record for tenant "
        f"'{tenant}' in this store: check the name, and that --config / INGEST_CONFIG / "
        "INGEST_DATA_DIR point at the service's store (`dlqtriage summary` counts every tenant)",
        highlight=False,
        markup=True,
    )


async def _known_tenant(dlq: DLQStore, tenant: str | None) -> None:
    """Warn (`_warn_unknown_tenant`) when a --tenant with nothing to do is one this store has
    never heard of."""
    if tenant is None:
        return
    if await dlq.count(DLQFilter(tenant=tenant)) or await dlq.processed_total(tenant):
        return
    _warn_unknown_tenant(tenant)


# ------------------------------------------------------------------------------ commands


@app.command()
def summary(tenant: TenantOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Counts by reason (retryable or not), sink and source; the DLQ rate against the SLO."""
    tenant_name(tenant)
    cfg = _config(config)

    async def go(dlq: DLQStore) -> analyze.Summary:
        flt = DLQFilter(tenant=tenant)
        groups = await dlq.groups(flt)
        return analyze.summarize(
            groups, await dlq.processed_total(tenant), await dlq.count_records(flt)
        )

    result = _run(_with_dlq(cfg, go))
    if json_out:
        render.emit_json({"tenant": tenant, **result.as_dict()})
    else:
        render.summary(result, tenant)
    if tenant is not None and result.total == 0 and result.processed == 0:
        _warn_unknown_tenant(tenant)  # a mistyped tenant looked exactly like a clean one


@app.command()
def sample(
    reason: ReasonsOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Entries to show.")] = 10,
    full: Annotated[bool, typer.Option("--full", help="Include the original payload.")] = False,
    tenant: TenantOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Readable entries with their error detail (JSON path, expected, found, message)."""
    tenant_name(tenant)
    flt = DLQFilter(tenant=tenant, reasons=_reasons(reason))
    cfg = _config(config)
    entries = _run(_with_dlq(cfg, lambda dlq: _first(dlq, flt, limit)))
    if json_out:
        render.emit_json([render.entry_dict(e, full) for e in entries])
    else:
        render.sample(entries, full)


@app.command("analyze")
def analyze_cmd(
    tenant: TenantOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False
) -> None:
    """Group entries into error patterns, each with counts, sources, an example and a next step."""
    tenant_name(tenant)
    cfg = _config(config)

    async def go(dlq: DLQStore) -> list[analyze.Pattern]:
        entries: list[DLQEntry] = []
        async for page in dlq.scan(DLQFilter(tenant=tenant), 1000):
            entries.extend(replace(e, payload=b"") for e in page)  # patterns need no payloads
        return analyze.patterns(entries)

    found = _run(_with_dlq(cfg, go))
    if json_out:
        render.emit_json(
            {
                "tenant": tenant,
                "total": sum(p.count for p in found),
                "patterns": [p.as_dict() for p in found],
            }
        )
    else:
        render.patterns(found)


@app.command()
def redrive(
    tenant: TenantOpt = None,
    reason: ReasonsOpt = None,
    source: Annotated[list[str] | None, typer.Option(help="Source name (repeatable).")] = None,
    sink: Annotated[
        list[str] | None, typer.Option(help="Sink name; '-' = failed before routing (repeatable).")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Last failure at/after: ISO or 2h, 7d.")] = None,
    until: Annotated[str | None, typer.Option(help="Last failure before: ISO or 2h, 7d.")] = None,
    entry_id: Annotated[
        list[int] | None, typer.Option("--id", min=1, max=MAX_ID, help="Entry id (repeatable).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would go; change nothing.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Also redrive non-retryable codes (after fixing their cause)."
        ),
    ] = False,
    page_size: Annotated[int, typer.Option("--page-size", min=1, max=5000)] = 200,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    as_: AsOpt = None,
) -> None:
    """Send entries back through decode and delivery, to the sink where each failed."""
    tenant_name(tenant)
    reasons = _reasons(reason)
    if not reasons and not entry_id:
        valid = ", ".join(r.value for r in ReasonCode)
        fail(f"say what to redrive: --reason (one of {valid}) and/or --id", EXIT_USAGE)
    flt = DLQFilter(
        tenant=tenant,
        reasons=reasons,
        sources=source or (),
        sinks=sink or (),
        since=parse_when(since, "--since"),
        until=parse_when(until, "--until"),
        ids=entry_id or (),
    )
    cfg = _config(config)
    code = _run(
        _redrive(
            cfg,
            flt,
            dry_run=dry_run,
            force=force,
            page_size=page_size,
            json_out=json_out,
            who=actor(as_),
        )
    )
    raise typer.Exit(code)


async def _redrive(
    cfg: Config,
    flt: DLQFilter,
    *,
    dry_run: bool,
    force: bool,
    page_size: int,
    json_out: bool,
    who: str,
) -> int:
    from ingest.factory import build_core
    from ingest.triage.redrive import redrive as run_redrive

    core = await build_core(cfg)
    try:
        groups = await core.stores.dlq.groups(flt)
        total = sum(g.count for g in groups)
        if total == 0:
            await _known_tenant(core.stores.dlq, flt.tenant)
        why = analyze.refusal({*flt.reasons, *(g.reason for g in groups)})
        if dry_run:
            entries = await _first(core.stores.dlq, flt, 10_000 if json_out else 50)
            if json_out:
                render.emit_json(
                    {
                        "dry_run": True,
                        "count": total,
                        "needs_force": why,
                        "ids": [e.id for e in entries],
                    }
                )
            else:
                render.entry_list("would redrive", entries, total)
                if why and not force:
                    render.console.print(f"note: a real run needs --force: {why}")
            return 0
        if why and not force:
            fail(f"refusing to redrive: {why}", EXIT_USAGE)
        # Entries go back to the sink they failed at (every routed sink for decode failures):
        # if one of those cannot even start, redriving would only put them back (exit 3).
        targets = {g.sink for g in groups if g.sink is not None}
        down = await core.start_sinks(None if any(g.sink is None for g in groups) else targets)
        if down:
            where = "; ".join(f"{name}: {why}" for name, why in sorted(down.items()))
            fail(f"sink unreachable, nothing was redriven ({where})", EXIT_UNAVAILABLE)
        stop = StopFlag()
        with stop.installed(), _progress(total, enabled=not json_out) as advance:
            result = await run_redrive(
                core, flt, page_size=page_size, on_page=advance, should_stop=stop.is_set
            )
        outcome = "interrupted" if result.interrupted else "failed" if result.failed else "ok"
        detail = {"filter": _filter_doc(flt), "force": force, **result.as_dict()}
        await audit_cli(
            core.stores, who, "dlq.redrive", outcome=outcome, tenant=flt.tenant, detail=detail
        )
    finally:
        await core.close()
    if json_out:
        render.emit_json(result.as_dict())
    else:
        render.console.print(
            f"redrive: {result.selected} entries, {result.delivered} delivered (removed from "
            f"the DLQ), {result.failed} failed again"
            + (f" ({dict(result.new_reasons)})" if result.new_reasons else "")
            + (
                " — interrupted: run the same command again to continue"
                if result.interrupted
                else ""
            )
        )
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if result.failed else 0


def _progress(total: int, *, enabled: bool) -> Any:
    """A rich progress bar (stderr) for runs longer than a page; a no-op otherwise."""
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    @contextlib.contextmanager
    def cm() -> Any:
        if not enabled or total <= 500:
            yield lambda n: None
            return
        with Progress(
            "redrive",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        ) as bar:
            task = bar.add_task("redrive", total=total)
            yield lambda n: bar.advance(task, n)

    return cm()


@app.command()
def purge(
    older_than: Annotated[
        float,
        typer.Option("--older-than", help=f"Days since the entry first failed (0 to {MAX_DAYS})."),
    ],
    reason: ReasonsOpt = None,
    tenant: TenantOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    as_: AsOpt = None,
) -> None:
    """Delete entries older than DAYS (for a reason code), after a dry run or confirmation."""
    tenant_name(tenant)
    days = finite(older_than, "--older-than", low=0, high=MAX_DAYS)
    flt = DLQFilter(
        tenant=tenant,
        reasons=_reasons(reason),
        older_than=datetime.now(UTC) - timedelta(days=days),
    )
    cfg = _config(config)

    async def listing(dlq: DLQStore) -> tuple[int, list[DLQEntry]]:
        total = await dlq.count(flt)
        if total == 0:
            await _known_tenant(dlq, tenant)
        return total, await _first(dlq, flt, 100_000 if json_out else 50)

    total, entries = _run(_with_dlq(cfg, listing))
    if dry_run or total == 0:
        if json_out:
            render.emit_json({"dry_run": dry_run, "count": total, "ids": [e.id for e in entries]})
        else:
            render.entry_list("would purge" if dry_run else "nothing to purge", entries, total)
        return
    if not yes:
        if not sys.stdin.isatty():
            fail(
                f"refusing to purge {total} entries without confirmation: stdin is not a "
                "terminal; pass --yes",
                EXIT_USAGE,
            )
        if not typer.confirm(f"Purge {total} DLQ entries? This cannot be undone."):
            fail("purge aborted; nothing was deleted", EXIT_FAILED)

    async def delete(stores: Any) -> list[int]:
        gone: list[int] = []
        async for page in stores.dlq.scan(flt, 1000):
            ids = [e.id for e in page if e.id is not None]
            await stores.dlq.delete(ids)
            gone.extend(ids)
        await audit_cli(
            stores,
            actor(as_),
            "dlq.purge",
            tenant=tenant,
            detail={"filter": _filter_doc(flt), "deleted": len(gone)},
        )
        return gone

    gone = _run(_with_stores(cfg, delete))
    if json_out:
        render.emit_json({"dry_run": False, "deleted": len(gone), "ids": gone})
    else:
        render.console.print(f"purged {len(gone)} DLQ entries")


def _filter_doc(flt: DLQFilter) -> dict[str, Any]:
    """The filter as the audit trail keeps it."""
    return {k: v for k, v in asdict(flt).items() if v not in (None, (), [])}


def main() -> None:
    app()


if __name__ == "__main__":
    main()
