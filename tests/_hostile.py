"""Hypothesis strategies for hostile values: what a sender, a file or a bug can hand us.

Shared by the DLQ-fit tests (SQLite in unit, Postgres in integration) and the fuzz test that
drives the running service (tests/e2e/test_fuzz_service.py).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from ingest.records import DLQEntry, ReasonCode

# Numbers at and around every boundary that matters: 53-bit floats, 63/64-bit integers, far out
BIG_INTS = st.sampled_from(
    [2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 10**30, -(10**40)]
) | st.integers()
ODD_TEXT = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()), max_size=40
) | st.sampled_from(["\x00", "a\x00b", "\ud800", "\udfff", "\u202e", "\ufeff", "é" * 3, "𝕏"])


def nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


JSON_LEAF = st.none() | st.booleans() | BIG_INTS | st.floats() | ODD_TEXT
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
    max_leaves=12,
) | st.sampled_from([nested(40), nested(300), nested(1000)])


@st.composite
def hostile_entries(draw: st.DrawFn) -> DLQEntry:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return DLQEntry(
        dedupe_key=draw(st.binary(min_size=32, max_size=32)),
        tenant=draw(st.sampled_from(["acme", "t\x00x", "\ud800"])),
        source=draw(st.sampled_from(["webhook", "inbox"])),
        sink=draw(st.none() | st.just("sqlite")),
        reason=draw(st.sampled_from(list(ReasonCode))),
        detail=draw(st.dictionaries(ODD_TEXT, JSON_VALUE, max_size=4)),
        payload=draw(st.binary(max_size=200)),
        attempts=1,
        first_failed_at=at,
        last_failed_at=at,
        entity_type=draw(st.none() | ODD_TEXT),
        entity_id=draw(st.none() | ODD_TEXT),
        revision=draw(st.none() | BIG_INTS),
    )


def assert_stored(entries: list[DLQEntry], stored: list[DLQEntry]) -> None:
    """Every entry is in the store once, its payload and reason exact, its revision too
    when a 64-bit column can hold it."""
    by_key = {e.dedupe_key: e for e in stored}
    assert len(stored) == len(entries) == len(by_key)
    for e in entries:
        got = by_key[e.dedupe_key]
        assert got.payload == e.payload and got.reason is e.reason
        if e.revision is not None and -(2**63) <= e.revision < 2**63:
            assert got.revision == e.revision


# ------------------------------------------------------------------ records and files
# A line as sent: its bytes, and the entity id when it is one of "our" records (unique per
# line, so the sink can be searched for it); None for arbitrary JSON or bytes.
SentLine = tuple[bytes, str | None]
# What the strategy draws: a record-shaped body (with the name of its id field and the
# encoding) or raw bytes. `render` gives it a unique id, so every line is told apart.
Hostile = tuple[dict[str, Any] | bytes, str | None, str]

DATES = st.sampled_from(["2025-01-01T00:00:00Z", "2025-01-01T00:00:00.123456+02:00",
                         "2025-13-01T00:00:00Z", "", "9999-12-31T23:59:59Z", "yesterday",
                         "2025-01-01"]) | st.text(max_size=30)
ENTITY_TYPES = st.sampled_from(["order", "order", "note", "", "x" * 300, "ordér", "a\x00b"])
REVISIONS = st.sampled_from([1, 1, 2, 0, -1]) | BIG_INTS | st.floats() | st.sampled_from(
    ["1", None, True, [1]])


def _encode(value: Any, mode: str) -> bytes:
    """As JSON text: `ascii` escapes everything (lone surrogates as \\ud800), `raw` writes
    UTF-8 (lone surrogates as invalid bytes). Big integers stay exact (stdlib json)."""
    if mode == "ascii":
        return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def hostile_records(draw: st.DrawFn, tenant: str) -> Hostile:
    """Mostly record-shaped (v1/v2/v3) with hostile values, else arbitrary JSON or bytes.
    No line holds a newline or surrounding whitespace (transport, not content)."""
    kind = draw(st.sampled_from(["v3", "v3", "v3", "v2", "v1", "json", "bytes"]))
    mode = draw(st.sampled_from(["ascii", "ascii", "raw"]))
    if kind == "bytes":
        raw = draw(st.binary(min_size=1, max_size=80)).replace(b"\n", b" ").replace(b"\r", b" ")
        return raw.strip().removeprefix(b"\xef\xbb\xbf") or b"\xff", None, mode
    if kind == "json":
        return _encode(draw(JSON_VALUE), mode), None, mode
    eid = draw(ODD_TEXT)
    tenant_value = draw(st.sampled_from([tenant, tenant, tenant, tenant, "other-tenant", ""]))
    attributes = draw(st.dictionaries(ODD_TEXT, JSON_VALUE, max_size=4))
    if kind == "v1":
        body: dict[str, Any] = {"schema_version": 1, "tenant": tenant_value, "type": "order",
                                "id": eid, "rev": draw(REVISIONS),
                                "ts": draw(st.sampled_from([1.7e9, 0, -1, 1e20]) | BIG_INTS),
                                "data": attributes}
        return body, "id", mode
    body = {"schema_version": 2 if kind == "v2" else 3, "tenant_id": tenant_value,
            "entity_type": draw(ENTITY_TYPES), "entity_id": eid,
            "revision": draw(REVISIONS), "occurred_at": draw(DATES),
            "attributes": attributes}
    if kind == "v3" and draw(st.booleans()):
        body["priority"] = draw(st.sampled_from(["high", "low", "urgent", 1]))
    if draw(st.integers(0, 9)) == 0:
        body["unexpected"] = draw(JSON_VALUE)
    return body, "entity_id", mode


def render(item: Hostile, prefix: str) -> SentLine:
    """The line to send; a record's id becomes `prefix` + its drawn text (still hostile)."""
    value, id_field, mode = item
    if isinstance(value, bytes):
        return value, None
    body = dict(value)
    eid = f"{prefix}{body[id_field]}" if id_field else None
    if id_field:
        body[id_field] = eid
    return _encode(body, mode), eid


FILE_NAMES = st.sampled_from([
    "plain.jsonl", "with space.jsonl", "ünïcödé.jsonl", "-leading-dash.jsonl", "x" * 200 + ".jsonl",
    "UPPER.JSONL", "dots...jsonl", "semi;colon.ndjson", "quote'name.jsonl", "tab\tname.jsonl",
])
