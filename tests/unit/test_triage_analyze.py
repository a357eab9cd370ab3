"""The words operators act on: pattern signatures, suggestions, SLO marking, refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ingest.records import DLQEntry, ReasonCode
from ingest.state.base import DLQGroup
from ingest.triage import analyze

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def entry(reason: ReasonCode, detail: dict[str, object], *, sink: str | None = None,
          source: str = "orders", at: datetime = T0, id_: int = 1) -> DLQEntry:
    return DLQEntry(b"k", "acme-corp", source, sink, reason, dict(detail), b"{}", 1, at, at,
                    "order", f"o-{id_}", 1, id_)


AMOUNT = {"kind": "type", "path": "$.attributes.amount", "expected": "number",
          "found": "string", "message": "'$.attributes.amount' is string, expected number"}


def test_drift_groups_by_path_and_type_and_says_what_changed() -> None:
    entries = [entry(ReasonCode.SCHEMA_DRIFT, AMOUNT, at=T0 + timedelta(hours=i), id_=i)
               for i in range(3)]
    entries.append(entry(ReasonCode.SCHEMA_DRIFT, {**AMOUNT, "found": "null"}, id_=9))
    found = analyze.patterns(entries)
    assert [(p.signature, p.count) for p in found] == [
        ("$.attributes.amount type string->number", 3),
        ("$.attributes.amount type null->number", 1)]
    top = found[0]
    assert top.first_seen == T0 and top.last_seen == T0 + timedelta(hours=2)
    assert top.suggestion.startswith(
        "attribute `amount` arrived as string instead of number since 2026-11-26 from source "
        "`orders` — add a transformer in ingest/transformers/ (or a config transformer) then "
        "redrive")
    assert "--reason SCHEMA_DRIFT" in top.suggestion and "--force" in top.suggestion


def test_sink_failures_group_by_sink_and_error_class() -> None:
    conn = {"error_class": "ConnectionRefusedError", "message": "refused"}
    found = analyze.patterns([
        entry(ReasonCode.CONNECTION_ERROR, conn, sink="pg", id_=1),
        entry(ReasonCode.CONNECTION_ERROR, conn, sink="pg", id_=2, source="shop"),
        entry(ReasonCode.CONSTRAINT_VIOLATION, {"constraint": "entities_pkey"}, sink="pg"),
        entry(ReasonCode.OLDER_REVISION, {"stored_revision": 5}, sink="pg"),
    ])
    by_sig = {p.signature: p for p in found}
    conn_p = by_sig["pg ConnectionRefusedError"]
    assert conn_p.count == 2 and conn_p.sources == {"orders", "shop"}
    assert conn_p.suggestion.startswith("check the sink `pg`")
    assert "dlqtriage redrive --tenant acme-corp --reason CONNECTION_ERROR --sink pg" in (
        conn_p.suggestion)
    assert "entities_pkey" in by_sig["pg entities_pkey"].suggestion
    assert "safe to purge after review" in by_sig["pg older_revision"].suggestion


def test_summary_marks_the_slo() -> None:
    g = [DLQGroup(ReasonCode.SCHEMA_DRIFT, None, "orders", 4, T0, T0),
         DLQGroup(ReasonCode.CONNECTION_ERROR, "pg", "orders", 1, T0 - timedelta(days=1), T0)]
    s = analyze.summarize(g, processed=1000)
    assert s.total == 5 and s.rate == 0.005 and s.slo == "over"
    assert analyze.summarize(g, processed=1001).slo == "under"
    assert analyze.summarize([], processed=0).slo == "n/a"
    d = s.as_dict()
    assert d["by_reason"]["CONNECTION_ERROR"] == {"count": 1, "retryable": True}
    assert d["by_sink"] == {"-": 4, "pg": 1} and s.oldest == T0 - timedelta(days=1)


def test_reason_parsing_and_refusals() -> None:
    assert analyze.parse_reason("schema_drift") is ReasonCode.SCHEMA_DRIFT
    with pytest.raises(analyze.UnknownReason, match=r"valid codes: SCHEMA_DRIFT, .*CIRCUIT_OPEN"):
        analyze.parse_reason("DRIFT")
    assert analyze.refusal([ReasonCode.CONNECTION_ERROR, ReasonCode.SINK_TIMEOUT]) is None
    why = analyze.refusal([ReasonCode.VALIDATION_FAIL, ReasonCode.CIRCUIT_OPEN])
    assert why == ("VALIDATION_FAIL is not retryable (fix the transformer/schema first, "
                   "then --force)")
