"""The pod's /health/detailed: every worker's document folded into one, with the same keys.

An adapter or sink appears once, as the worst any worker sees it (status, breaker state), with
the largest lag, the summed counts, the union of per-worker maps (a Kafka adapter's
partitions) and each worker's own view under `workers`; a runbook query
such as `.adapters["s3-main"]` or `select(.value.lag_seconds > 60)` reads it as before.
"""

from __future__ import annotations

from typing import Any

_ADAPTER_RANK = {
    "restarting": 8,
    "stalled": 7,
    "error": 6,
    "draining": 5,
    "paused": 4,
    "starting": 3,
    "running": 2,
    "stopped": 1,
    "idle": 0,
}
_BREAKER_RANK = {"open": 2, "half_open": 1, "closed": 0}


def merge_adapters(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Adapters by name across workers (`docs`: worker name -> its health document)."""
    out: dict[str, Any] = {}
    for wname, doc in docs.items():
        for name, a in doc.get("adapters", {}).items():
            m = out.get(name)
            if m is None:
                m = out[name] = {**a, "errors": list(a.get("errors", [])), "workers": {}}
            else:
                if _ADAPTER_RANK.get(a["status"], 0) > _ADAPTER_RANK.get(m["status"], 0):
                    m["status"] = a["status"]
                m["lag_seconds"] = max(m.get("lag_seconds", 0.0), a.get("lag_seconds", 0.0))
                m["records_read"] = m.get("records_read", 0) + a.get("records_read", 0)
                if (a.get("last_checkpoint_at") or 0) > (m.get("last_checkpoint_at") or 0):
                    m["last_checkpoint"] = a.get("last_checkpoint")
                    m["last_checkpoint_at"] = a.get("last_checkpoint_at")
                # the same event seen by several workers (a skipped inbox file) is one line
                seen = set(m["errors"]) | set(a.get("errors", []))
                m["errors"] = sorted(seen, reverse=True)[:10]
                m["problem"] = m.get("problem") or a.get("problem")  # any worker's
                _merge_progress(m, a)
                for key, value in a.items():  # source-specific extras: partitions, backlogs
                    if key in _FOLDED:
                        continue
                    have = m.get(key)
                    if key in _SINCE:  # a time: the oldest any worker has, None if none
                        m[key] = min((t for t in (have, value) if _number(t)), default=None)
                        continue
                    if isinstance(value, dict) and isinstance(have, dict):
                        m[key] = {**have, **value}  # e.g. Kafka partitions: each worker's own
                    elif _number(value) and _number(have):
                        m[key] = max(have, value) if key in _SHARED_VIEWS else have + value
            m["workers"][wname] = {
                k: a.get(k)
                for k in ("status", "lag_seconds", "records_read", "last_checkpoint", "problem")
            }
    return out


# Counts every worker takes of the same shared thing, not of its own share: the inbox's files
# not yet done are listed by each worker scanning the one directory (summing doubled them),
# and each worker's webhook source counts the whole SQLite intake, not its shard's rows.
_SHARED_VIEWS = {"files_pending", "intake_backlog_records"}
# Times, not counts: the oldest wait is the pod's (summed, two workers' Kafka
# `uncommitted_since` made a date in 2077; and one worker's None hid another's time).
_SINCE = {"uncommitted_since"}

_FOLDED = {
    "stalled",
    "stalled_since",
    "progress",
    "kind",
    "status",
    "lag_seconds",
    "records_read",
    "last_checkpoint",
    "last_checkpoint_at",
    "errors",
    "problem",
    "workers",
}


def _merge_progress(m: dict[str, Any], a: dict[str, Any]) -> None:
    """Stalled if any worker's share is; progress summed (pending, restarts) or the worst."""
    m["stalled"] = bool(m.get("stalled")) or bool(a.get("stalled"))
    since = [t for t in (m.get("stalled_since"), a.get("stalled_since")) if t is not None]
    m["stalled_since"] = min(since) if since else None
    mine, theirs = m.get("progress"), a.get("progress")
    if not isinstance(theirs, dict):
        return
    if not isinstance(mine, dict):
        m["progress"] = dict(theirs)
        return
    merged = dict(mine)
    for key in ("pending_records", "restarts"):
        merged[key] = (mine.get(key) or 0) + (theirs.get(key) or 0)
    merged["seconds_since_progress"] = max(
        mine.get("seconds_since_progress") or 0, theirs.get("seconds_since_progress") or 0
    )
    for key, partner in (("last_commit_at", None), ("last_restart_at", "last_restart_error")):
        if (theirs.get(key) or 0) > (mine.get(key) or 0):
            merged[key] = theirs.get(key)
            if partner is not None:
                merged[partner] = theirs.get(partner)
    m["progress"] = merged


_STATUS_RANK = {"ok": 0, "degraded": 1, "unhealthy": 2}


def worst_status(docs: dict[str, dict[str, Any]], floor: str = "ok") -> str:
    """The worst top-level status of the workers' documents (and `floor`)."""
    statuses = [floor, *(str(d.get("status", "ok")) for d in docs.values())]
    return max(statuses, key=lambda st: _STATUS_RANK.get(st, 1))


def merge_problems(docs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every worker's problems, each naming its worker; one shared part (a store, the disk)
    seen by several workers is listed once per worker, so an operator sees who sees it."""
    return [
        {**problem, "worker": wname}
        for wname, doc in docs.items()
        for problem in doc.get("problems", [])
    ]


def merge_disk(docs: dict[str, dict[str, Any]], own: dict[str, Any]) -> dict[str, Any]:
    """The pod's own disk view (free space, intake refusal) with any worker's full disk."""
    view = dict(own)
    full = [d["disk"] for d in docs.values() if isinstance(d.get("disk"), dict)]
    waiting = [d for d in full if d.get("full")]
    view["full"] = bool(waiting)
    view["full_since"] = min(
        (d["full_since"] for d in waiting if d.get("full_since")), default=None
    )
    view["last_error"] = next((d.get("last_error") for d in waiting), None) or next(
        (d.get("last_error") for d in full if d.get("last_error")), None
    )
    return view


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def merge_sinks(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for wname, doc in docs.items():
        for name, s in doc.get("sinks", {}).items():
            m = out.get(name)
            if m is None or _BREAKER_RANK.get(s["state"], 0) > _BREAKER_RANK.get(m["state"], 0):
                kept = {} if m is None else m["workers"]
                m = out[name] = {**s, "workers": kept}
            elif not s.get("connection", {}).get("connected", True):
                m["connection"] = s["connection"]
            m["workers"][wname] = s["state"]
    return out


def first_stores(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The stores are shared: any worker's view, preferring one that reports a failure."""
    views = [d["stores"] for d in docs.values() if "stores" in d]
    for view in views:
        if "error" in str(view) or '"ok": false' in str(view).lower():
            return dict(view)
    return dict(views[0]) if views else {}
