"""How `replayctl` shows a plan's completion: a progress bar, duration, ETA and RTO verdict
for humans; the same figures as JSON for machines (`plans.progress_view` computes them)."""

from __future__ import annotations

import math
import re
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ingest.replay import plans as P
from ingest.timefmt import iso

_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'3600', '90m', '4h', '1h30m', '2d' -> seconds; ValueError with the accepted forms."""
    s = text.strip().lower()
    try:
        seconds = float(s)
    except ValueError:
        parts = _PART.findall(s)
        if not parts or "".join(n + u for n, u in parts) != s:
            raise ValueError(
                f"'{text}' is not a duration like 3600, 90m, 4h, 1h30m or 2d"
            ) from None
        seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"'{text}' must be a positive duration")
    return seconds


def human(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if math.isinf(seconds):
        return "never (not moving)"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def eta_note(plan: P.Plan, view: P.ProgressView) -> str | None:
    """Why there is no finite ETA, in words (None when there is one)."""
    if view.eta_seconds is not None and math.isfinite(view.eta_seconds):
        return None
    if plan.started_at is None:
        return "not started"
    if plan.state != P.RUNNING:
        return f"{plan.state}: nothing moves it until `replayctl run --plan {plan.id}`"
    if view.ratio is None:
        return "size unknown (a Kafka source): no projection; the RTO counts from the start"
    if view.ratio == 0:
        return "no record delivered yet"
    return None


def completion_doc(plan: P.Plan, now: float) -> dict[str, Any]:
    """JSON for `status --json` / `list --json`: numbers, never Infinity (null + a note)."""
    v = P.progress_view(plan, now)
    eta = v.eta_seconds if v.eta_seconds is not None and math.isfinite(v.eta_seconds) else None
    return {
        "ratio": v.ratio,
        "percent": None if v.ratio is None else round(100 * v.ratio, 1),
        "records_done": v.records_done,
        "estimate_records": v.estimate_records,
        "duration_seconds": v.duration_seconds,
        "eta_seconds": eta,
        "eta_at": None if eta is None or plan.state != P.RUNNING else iso(now + eta),
        "eta_note": eta_note(plan, v),
        "rto_seconds": v.rto_seconds,
        "rto_deadline": None
        if v.rto_seconds is None or plan.started_at is None
        else iso(plan.started_at + v.rto_seconds),
        "rto_at_risk": v.at_risk,
        "needs_seconds_at_throttle": v.needs_seconds,
    }


def verdict(view: P.ProgressView) -> Text:
    if view.rto_seconds is None:
        return Text("no RTO set")
    if view.at_risk is None:
        return Text(f"{human(view.rto_seconds)} (cannot tell yet)")
    if view.at_risk:
        return Text(f"{human(view.rto_seconds)}: AT RISK", style="bold red")
    return Text(f"{human(view.rto_seconds)}: on track")


def completion(plan: P.Plan, now: float) -> RenderableType:
    """The human block: bar + percent, then duration / ETA / RTO."""
    v = P.progress_view(plan, now)
    pct = "size unknown" if v.ratio is None else f"{100 * v.ratio:5.1f}%"
    done = (
        f"{v.records_done} of {v.estimate_records}"
        if v.estimate_records is not None
        else (f"{v.records_done}")
    )
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=1.0, completed=v.ratio or 0.0, width=40, pulse=v.ratio is None),
        Text(f"{pct}  {done} records"),
    )
    eta = human(v.eta_seconds)
    note = eta_note(plan, v)
    if note and (v.eta_seconds is None or math.isinf(v.eta_seconds)):
        eta = f"{eta} ({note})"
    lines = Table.grid(padding=(0, 2))
    lines.add_column(justify="right", style="bold")
    lines.add_row("duration", human(v.duration_seconds) if v.duration_seconds is not None else "-")
    lines.add_row("eta", eta if plan.state != P.COMPLETED else "done")
    lines.add_row("rto", verdict(v))
    if v.needs_seconds is not None:
        lines.add_row("at throttle", f"needs at least {human(v.needs_seconds)}")
    return Group(bar, lines)
