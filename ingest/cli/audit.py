"""`ingest audit`: the audit trail — who did what, when, from where — as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ingest.cli.common import load_existing_state, parse_when, run_async
from ingest.state.audit import AuditEntry, AuditFilter, audit_store
from ingest.timefmt import iso
from ingest.tools.console import console


def audit(
    actor: Annotated[str | None, typer.Option("--actor", help="Only this actor.")] = None,
    action: Annotated[
        str | None,
        typer.Option("--action", help="Action or prefix: admin., replay.approve, dlq. ..."),
    ] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="ISO date-time or 30m, 2h, 7d.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=100_000)] = 50,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Service config.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """The audit trail, newest first: every admin call and replay/redrive step."""
    start = parse_when(since, "--since")
    cfg = load_existing_state(config, "ingest audit")
    flt = AuditFilter(
        since=start.timestamp() if start else None,
        actor=actor,
        action=action,
        tenant=tenant,
        limit=limit,
    )

    async def go() -> list[AuditEntry]:
        from ingest.factory import open_stores

        stores = await open_stores(cfg)
        try:
            return await audit_store(stores).query(flt)
        finally:
            await stores.close()

    rows = run_async(go())
    if json_out:
        print(json.dumps([{**r.to_dict(), "when": iso(r.at)} for r in rows], indent=2))
        return
    from rich.table import Column, Table

    heads = ("when", "actor", "via", "action", "outcome", "tenant", "target", "from")
    table = Table(*(Column(h, overflow="fold") for h in heads))
    for r in rows:
        table.add_row(
            iso(r.at), r.actor, r.via, r.action, r.outcome, r.tenant or "", r.target, r.remote
        )
    # a pipe or a file gets whole lines, a terminal its width
    console().print(table)
