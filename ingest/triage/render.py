"""How `dlqtriage` shows things: rich tables for people, one JSON document for scripts.

Kept apart from the commands so each command's output has one shape in both modes: the JSON
is the same dict the table is drawn from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson
from rich.markup import escape
from rich.rule import Rule
from rich.syntax import Syntax
from rich.table import Table

from ingest.records import DLQEntry
from ingest.timefmt import iso
from ingest.tools import console as out
from ingest.triage.analyze import Pattern, Summary

console = out.console()


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def entry_dict(e: DLQEntry, full: bool = False) -> dict[str, Any]:
    """An entry as operators read it: the error detail that matters for its kind, not all."""
    d = e.detail
    if e.sink is None:
        error = {k: d.get(k) for k in ("path", "kind", "expected", "found", "message")}
    else:
        error = {
            k: d[k]
            for k in (
                "error_class",
                "constraint",
                "message",
                "stored_revision",
                "incoming_revision",
            )
            if d.get(k) is not None
        }
    out: dict[str, Any] = {
        "id": e.id,
        "tenant": e.tenant,
        "source": e.source,
        "sink": e.sink,
        "reason": e.reason.value,
        "entity_type": e.entity_type,
        "entity_id": e.entity_id,
        "revision": e.revision,
        "attempts": e.attempts,
        "first_failed_at": iso(e.first_failed_at),
        "last_failed_at": iso(e.last_failed_at),
        "error": error,
    }
    if full:
        out["payload"] = payload_text(e.payload)
        out["detail"] = d
    return out


def payload_text(payload: bytes) -> str:
    """Pretty JSON when it parses, else the bytes as text (CSV rows, broken lines)."""
    try:
        return orjson.dumps(orjson.loads(payload), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return payload.decode("utf-8", errors="replace")


def summary(s: Summary, tenant: str | None) -> None:
    scope = f"tenant {tenant}" if tenant else "all tenants"
    rate = "n/a (nothing processed yet)" if s.rate is None else f"{s.rate:.3%}"
    mark = {"over": "[bold red]OVER[/]", "under": "[green]under[/]"}.get(s.slo, escape(s.slo))
    out.styled(
        console,
        "[bold]DLQ summary[/] ({}): {} entries for {} records, {} records processed, "
        "DLQ rate {} — " + mark + " the 0.5% SLO",
        scope,
        s.total,
        s.dlq_records,
        s.processed,
        rate,
    )
    if s.oldest is not None and s.newest is not None:
        console.print(
            f"oldest entry {s.oldest:%Y-%m-%d %H:%M:%S}Z, newest {s.newest:%Y-%m-%d %H:%M:%S}Z"
        )
    by_reason = Table(title="by reason")
    for col in ("reason", "retryable", "count"):
        by_reason.add_column(col, justify="right" if col == "count" else "left")
    for reason, n in s.as_dict()["by_reason"].items():
        by_reason.add_row(reason, "yes" if n["retryable"] else "no", str(n["count"]))
    console.print(by_reason)
    for title, counts in (("by sink", s.by_sink), ("by source", s.by_source)):
        table = Table(title=title)
        table.add_column(title.split()[1])
        table.add_column("count", justify="right")
        for name, n in counts.items():
            table.add_row(name, str(n))
        console.print(table)


def sample(entries: Sequence[DLQEntry], full: bool) -> None:
    if not entries:
        console.print("no matching DLQ entries")
    for e in entries:
        d = entry_dict(e, full)
        title = f"#{e.id} {e.reason.value} {e.tenant}/{e.source} sink={e.sink or '-'}"
        # a rule and a payload as wide as their text, not as the console (240 off a terminal)
        console.print(Rule(title), width=min(console.width, max(80, len(title) + 8)))
        console.print(
            f"entity {e.entity_type}/{e.entity_id} revision {e.revision}; "
            f"attempts {e.attempts}; first failed {d['first_failed_at']}, "
            f"last failed {d['last_failed_at']}"
        )
        for key, value in d["error"].items():
            if value is not None:
                console.print(f"  {key}: {value}")
        if full:
            text = d["payload"]
            widest = max((len(line) for line in text.splitlines()), default=1)
            console.print(
                Syntax(text, "json", word_wrap=True, code_width=min(widest, console.width))
            )


def patterns(found: Sequence[Pattern]) -> None:
    if not found:
        console.print("no DLQ entries: nothing to analyze")
        return
    table = Table(title="DLQ patterns", show_lines=True)
    for col in ("reason", "signature", "count", "first / last seen", "sources", "example"):
        table.add_column(col, justify="right" if col == "count" else "left")
    for p in found:
        d = p.as_dict()
        table.add_row(
            p.reason.value,
            p.signature,
            str(p.count),
            f"{d['first_seen']}\n{d['last_seen']}",
            ", ".join(d["sources"]),
            f"#{p.example_id} {p.example_entity or ''}\n{p.detail.get('message', '')}",
        )
    console.print(table)
    for n, p in enumerate(found, 1):
        out.styled(console, "{}. [bold]{}[/] {}: {}", n, p.reason.value, p.signature, p.suggestion)


def entry_list(title: str, entries: Sequence[DLQEntry], total: int) -> None:
    table = Table(
        title=f"{title}: {total} entries" + (" (first shown)" if total > len(entries) else "")
    )
    for col in ("id", "tenant", "source", "sink", "reason", "entity", "attempts", "first failed"):
        table.add_column(col)
    for e in entries:
        table.add_row(
            str(e.id),
            e.tenant,
            e.source,
            e.sink or "-",
            e.reason.value,
            f"{e.entity_type}/{e.entity_id}@{e.revision}",
            str(e.attempts),
            f"{e.first_failed_at:%Y-%m-%d %H:%M:%S}",
        )
    console.print(table)
