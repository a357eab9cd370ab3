"""What the DLQ says, as data: summaries, error patterns and the next step for each.

Pure functions over `DLQEntry`/`DLQGroup` values, so the wording operators act on is pinned by
unit tests and the CLI only fetches and prints.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ingest.records import DLQEntry, ReasonCode
from ingest.state.base import DLQGroup
from ingest.timefmt import iso

SLO_RATE = 0.005  # the runbook's "DLQ rate <0.5%"
NON_RETRYABLE_HINT = {
    ReasonCode.SCHEMA_DRIFT: "fix the transformer/schema first, then --force",
    ReasonCode.VALIDATION_FAIL: "fix the transformer/schema first, then --force",
    ReasonCode.OLDER_REVISION: "a newer revision is already stored: review, then purge instead",
    ReasonCode.CONSTRAINT_VIOLATION: "fix the data or the sink's constraint first, then --force",
}


class UnknownReason(ValueError):
    """A reason code the runbook does not define; the message lists the valid ones."""


def parse_reason(text: str) -> ReasonCode:
    """Case-insensitive; an unknown code names every valid one so the operator can retype."""
    try:
        return ReasonCode(text.strip().upper())
    except ValueError:
        valid = ", ".join(r.value for r in ReasonCode)
        raise UnknownReason(f"unknown reason code '{text}'; valid codes: {valid}") from None


def refusal(reasons: Iterable[ReasonCode]) -> str | None:
    """Why a redrive of these codes needs --force, in words; None when all are retryable."""
    blocked = sorted({r for r in reasons if not r.retryable})
    if not blocked:
        return None
    parts = [f"{r.value} is not retryable ({NON_RETRYABLE_HINT[r]})" for r in blocked]
    return "; ".join(parts)


# ------------------------------------------------------------------------------ summary


@dataclass(slots=True)
class Summary:
    """`total` counts DLQ entries (one per record and failing sink); `records` counts the
    records they belong to, which is what the DLQ rate divides (the runbook: records sent
    to the DLQ over records processed), so a record failing two sinks counts once."""

    total: int
    processed: int
    by_reason: dict[str, int]
    by_sink: dict[str, int]
    by_source: dict[str, int]
    oldest: datetime | None
    newest: datetime | None
    records: int | None = None  # None: not known, taken as `total`

    @property
    def dlq_records(self) -> int:
        return self.total if self.records is None else self.records

    @property
    def rate(self) -> float | None:
        return self.dlq_records / self.processed if self.processed else None

    @property
    def slo(self) -> str:
        """'over' / 'under' the 0.5% SLO ('n/a' before anything was processed)."""
        rate = self.rate
        if rate is None:
            return "n/a"
        return "over" if rate >= SLO_RATE else "under"

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "records": self.dlq_records,
            "processed": self.processed,
            "dlq_rate": self.rate,
            "slo_rate": SLO_RATE,
            "slo": self.slo,
            "by_reason": {
                r: {"count": n, "retryable": ReasonCode(r).retryable}
                for r, n in self.by_reason.items()
            },
            "by_sink": self.by_sink,
            "by_source": self.by_source,
            "oldest": iso(self.oldest),
            "newest": iso(self.newest),
        }


def summarize(groups: Sequence[DLQGroup], processed: int, records: int | None = None) -> Summary:
    reasons: Counter[str] = Counter()
    sinks: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    for g in groups:
        reasons[g.reason.value] += g.count
        sinks[g.sink or "-"] += g.count
        sources[g.source] += g.count
    return Summary(
        total=sum(g.count for g in groups),
        processed=processed,
        records=records,
        by_reason=dict(reasons.most_common()),
        by_sink=dict(sinks.most_common()),
        by_source=dict(sources.most_common()),
        oldest=min((g.oldest for g in groups), default=None),
        newest=max((g.newest for g in groups), default=None),
    )


# ------------------------------------------------------------------------------ patterns


@dataclass(slots=True)
class Pattern:
    """Entries failing the same way: same reason code and error signature."""

    reason: ReasonCode
    signature: str
    detail: dict[str, Any]  # the example's detail: path/kind/found/expected or error_class
    count: int = 0
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    sources: set[str] = field(default_factory=set)
    sinks: set[str] = field(default_factory=set)
    tenants: set[str] = field(default_factory=set)
    example_id: int | None = None
    example_entity: str | None = None
    suggestion: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason.value,
            "retryable": self.reason.retryable,
            "signature": self.signature,
            "count": self.count,
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
            "sources": sorted(self.sources),
            "sinks": sorted(self.sinks),
            "example": {
                "id": self.example_id,
                "entity": self.example_entity,
                "message": self.detail.get("message"),
            },
            "suggestion": self.suggestion,
        }


def signature(entry: DLQEntry) -> str:
    """The error's shape without its values: what one fix would resolve at once."""
    d = entry.detail
    if entry.sink is None:  # decoder: JSON path + keyword (+ found type for type errors)
        sig = f"{d.get('path', '$')} {d.get('kind', 'unknown')}"
        if d.get("kind") == "type":
            sig += f" {d.get('found')}->{d.get('expected')}"
        return sig
    if entry.reason is ReasonCode.OLDER_REVISION:
        return f"{entry.sink} older_revision"
    what = d.get("constraint") or d.get("error_class") or "error"
    return f"{entry.sink} {what}"


def patterns(entries: Iterable[DLQEntry]) -> list[Pattern]:
    """Group entries (any number of pages) into patterns, largest first, each with advice."""
    found: dict[tuple[ReasonCode, str], Pattern] = {}
    for e in entries:
        key = (e.reason, signature(e))
        p = found.get(key)
        if p is None:
            p = found[key] = Pattern(
                e.reason, key[1], dict(e.detail), example_id=e.id, example_entity=_entity(e)
            )
        p.count += 1
        p.first_seen = _min(p.first_seen, e.first_failed_at)
        p.last_seen = _max(p.last_seen, e.last_failed_at)
        p.sources.add(e.source)
        p.tenants.add(e.tenant)
        if e.sink is not None:
            p.sinks.add(e.sink)
    out = sorted(found.values(), key=lambda p: (-p.count, p.reason.value, p.signature))
    for p in out:
        p.suggestion = suggest(p)
    return out


def suggest(p: Pattern) -> str:
    """The next step for a pattern, in the runbook's words."""
    d = p.detail
    since = f" since {p.first_seen.date().isoformat()}" if p.first_seen else ""
    srcs = ", ".join(f"`{s}`" for s in sorted(p.sources))
    origin = f"{since} from source {srcs}" if srcs else since
    redrive = _redrive_cmd(p)
    if p.reason is ReasonCode.SCHEMA_DRIFT:
        what = _field(str(d.get("path", "$")))
        kind = d.get("kind")
        if kind == "type":
            problem = f"{what} arrived as {d.get('found')} instead of {d.get('expected')}"
        elif kind == "required":
            problem = f"{what} is missing (dropped or renamed by the sender)"
        elif kind == "additionalProperties":
            problem = f"{what} is not in the schema (renamed or new in the sender's schema?)"
        elif kind == "unknown_version":
            problem = f"schema_version {d.get('found')!r} is not one this service reads"
        else:
            problem = f"{what} does not match the schema ({kind})"
        return (
            f"{problem}{origin} — add a transformer in ingest/transformers/ (or a config "
            f"transformer) then redrive: {redrive} --force"
        )
    if p.reason is ReasonCode.VALIDATION_FAIL:
        kind = d.get("kind")
        if kind in ("json", "utf8", "corrupt_file", "unreadable", "size"):
            return (
                f"unreadable or oversized input{origin} ({d.get('message')}) — fix the "
                "producer; these bytes cannot be repaired here: purge after review"
            )
        what = _field(str(d.get("path", "$")))
        return (
            f"{what} breaks rule `{kind}` (expected {d.get('expected')}, found "
            f"{d.get('found')!r}){origin} — fix the data at the source or review the rule "
            f"in ingest/schema/; once fixed, redrive: {redrive} --force"
        )
    if p.reason is ReasonCode.OLDER_REVISION:
        return (
            "a newer revision of the entity is already stored — safe to purge after review: "
            "dlqtriage purge --older-than 7 --reason OLDER_REVISION"
        )
    sinks = ", ".join(f"`{s}`" for s in sorted(p.sinks)) or "the sink"
    if p.reason is ReasonCode.CONSTRAINT_VIOLATION:
        what = d.get("constraint") or d.get("error_class") or "a constraint"
        return (
            f"sink {sinks} refused the rows ({what}){origin} — fix the data or the sink "
            f"schema, then redrive: {redrive} --force"
        )
    if p.reason is ReasonCode.RATE_LIMITED:
        return f"check rate limits and quotas of {sinks}, then redrive: {redrive}"
    return f"check the sink {sinks} (health, connectivity, latency), then redrive: {redrive}"


def _redrive_cmd(p: Pattern) -> str:
    cmd = "dlqtriage redrive"
    if len(p.tenants) == 1:
        cmd += f" --tenant {next(iter(p.tenants))}"
    cmd += f" --reason {p.reason.value}"
    if len(p.sinks) == 1:
        cmd += f" --sink {next(iter(p.sinks))}"
    return cmd


def _field(path: str) -> str:
    """`$.attributes.amount` -> attribute `amount`; other paths as they are."""
    prefix = "$.attributes."
    if path.startswith(prefix) and "." not in path[len(prefix) :]:
        return f"attribute `{path[len(prefix) :]}`"
    return f"field `{path}`"


def _entity(e: DLQEntry) -> str | None:
    if e.entity_id is None:
        return None
    rev = f"@{e.revision}" if e.revision is not None else ""
    return f"{e.entity_type or '?'}/{e.entity_id}{rev}"


def _min(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b < a else a


def _max(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b > a else a
