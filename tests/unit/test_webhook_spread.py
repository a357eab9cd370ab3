"""The door keys each webhook line by its entity (ingest.webhook.spread), and the SQLite
intake stores a request as one row per worker group (`SQLiteIntake.rows`).

What exactness needs (docs/architecture.md, Scale-out): every record that the decoder turns
into a Record of entity E gets the same key, whatever the line looks like (schema version,
field order, whitespace, other fields, revision), so all of E's records are read by one
worker, in the order they were sent. Checked against the real decoder, not a copy of its
rules.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pipeline.decode import Decoder
from ingest.records import RawRecord, Record
from ingest.webhook.http import split_values
from ingest.webhook.spread import entity_keys
from ingest.webhook.sqlite import PARTITIONS, partition, rows_of

DECODER = Decoder()
TENANT = "acme"
ENTITIES = [("order", "o-1"), ("order", "o-2"), ("invoice", "o-1"), ("order", "é\u2028x")]


def body_of(version: int, kind: str, ident: str, rev: int, attrs: dict[str, Any]) -> dict[str, Any]:
    if version == 1:
        return {"schema_version": 1, "tenant": TENANT, "type": kind, "id": ident, "rev": rev,
                "ts": 1_700_000_000, "data": attrs}  # fmt: skip
    return {"schema_version": version, "tenant_id": TENANT, "entity_type": kind,
            "entity_id": ident, "revision": rev, "occurred_at": "2025-01-01T00:00:00Z",
            "attributes": attrs}  # fmt: skip


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    """A record line of one of a few entities, in any version and layout; or a line that
    is not a record at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"{not json", b"[1,2]", b'"x"', b'{"entity_id": 5}']))
    kind, ident = draw(st.sampled_from(ENTITIES))
    attrs = draw(st.dictionaries(st.sampled_from(["a", "b", "amount"]), st.integers(0, 9)))
    body = body_of(draw(st.integers(1, 3)), kind, ident, draw(st.integers(1, 5)), attrs)
    items = list(body.items())
    order = draw(st.permutations(range(len(items))))
    text = orjson.dumps(dict(items[i] for i in order))
    if draw(st.booleans()):
        text = text.replace(b":", b": ").replace(b",", b" , ")
    return text


@settings(max_examples=300, deadline=None)
@given(st.lists(lines(), min_size=1, max_size=30), st.integers(1, 5))
def test_records_of_one_entity_share_a_key_and_a_row(body: list[bytes], groups: int) -> None:
    """Split as the door does, keyed, stored as `SQLiteIntake.rows`: every Record the decoder
    makes of entity E has one key; E's lines are all in one row, in the order sent; every
    line is stored exactly once."""
    got, _, values = split_values(b"\n".join(body), "application/x-ndjson")
    if not isinstance(got, list):  # no line parsed: the door refuses the whole body (400)
        return
    keys = entity_keys(TENANT, values, got)
    decoded = DECODER.decode_many(
        [RawRecord(ln, TENANT, "s", i, i, 0.0) for i, ln in enumerate(got)]
    )
    key_of: dict[tuple[str, str, str], int] = {}
    for rec, key in zip(decoded, keys, strict=True):
        if isinstance(rec, Record):
            assert key_of.setdefault(rec.entity_key, key) == key, rec.entity_key

    stored = rows_of(TENANT, got, keys, groups)
    assert sorted(ln for _, group in stored for ln in group) == sorted(got)
    assert len({part for part, _ in stored}) == len(stored)  # one row per group
    for part, group in stored:  # each row: its group's lines, all of them, in the order sent
        mine = [
            ln
            for ln, k in zip(got, keys, strict=True)
            if groups == 1 or k % groups == part % groups
        ]
        assert list(group) == mine


def test_one_tenant_spreads_and_without_keys_stays_on_its_partition() -> None:
    got = [orjson.dumps(body_of(3, "order", f"e-{i}", 1, {})) for i in range(100)]
    keys = entity_keys(TENANT, [orjson.loads(ln) for ln in got], got)
    parts = {part for part, _ in rows_of(TENANT, got, keys, 2)}
    assert parts == {2 * PARTITIONS, 2 * PARTITIONS + 1}  # one tenant reaches both workers
    assert rows_of(TENANT, got, None, 2) == [(partition(TENANT), got)]
    assert rows_of(TENANT, got, keys, 1) == [(partition(TENANT), got)]
