"""Golden dedupe keys: fixed records -> the keys main computed for them on 2026-12-01.

Stored dedupe keys (idempotency stores, DLQ rows, sink rows) depend on the exact canonical
bytes of a body (`ingest.records.dedupe_key`: orjson, sorted keys, no whitespace) and on the
decoder's fast path building the same body as the slow path. Any change to either that moves
a single byte changes a key here, and this test fails: a stored key would no longer match the
same record sent again. Do not update these hex strings; a new canonical form would need a
migration of every store instead.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ingest.pipeline.decode import Decoder
from ingest.records import RawRecord, Record, dedupe_key

NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z


def body(**changes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "schema_version": 3,
        "tenant_id": "acme",
        "entity_type": "order",
        "entity_id": "o-1",
        "revision": 7,
        "occurred_at": "2024-05-01T11:00:00Z",
        "attributes": {"amount": 12.5, "currency": "EUR", "status": "new"},
    }
    out.update(changes)
    return out


# (name, bytes as sent) -> hex key; the bytes go through Decoder.decode_many (fast path when
# it applies, else the slow path) exactly as the service decodes them.
GOLDEN: list[tuple[str, bytes, str]] = [
    ("flat", orjson.dumps(body()), "@flat"),
    (
        "unsorted attributes, defaults sent",
        orjson.dumps(
            body(
                attributes={"status": "new", "currency": "EUR", "amount": 12.5},
                priority="normal",
                relations=[],
                deleted=False,
            )
        ),
        "@flat",  # the same record as "flat": the same key
    ),
    (
        "nested, unicode, big and negative integers, floats",
        orjson.dumps(
            body(
                entity_id="ö-é-😀-\u2028",
                attributes={
                    "zeta": {"b": [1, 2.25, None, True], "a": {"y": "ÿ", "x": -(2**63)}},
                    "amount": 0.1,
                    "quantity": 2**63 - 1,
                    "big": 2**64 - 1,
                    "tiny": 5e-324,
                    "huge": 1.7976931348623157e308,
                    "neg": -0.0,
                    "exp": 1e16,
                    "name": 'quote " backslash \\ tab \t nul \u0000 ctl \u001f',
                    "Émoji": "🎉",
                    "": "empty key",
                },
            )
        ),
        "@nested",
    ),
    (
        "relations, priority, tombstone",
        orjson.dumps(
            body(
                priority="high",
                deleted=True,
                relations=[
                    {"target_id": "c-1", "type": "OWNS", "target_type": "customer"},
                    {"type": "HAS", "target_type": "item", "target_id": "i-\u00e9"},
                ],
            )
        ),
        "@relations",
    ),
    (
        "schema_version 1 (upgraded: slow path)",
        orjson.dumps(
            {
                "schema_version": 1,
                "tenant": "acme",
                "type": "order",
                "id": "o-1",
                "rev": 7,
                "ts": 1714561200,
                "data": {"amount": 12.5, "currency": "EUR", "status": "new"},
            }
        ),
        "@v1",
    ),
]

KEYS = {
    "@flat": "6d2b198c0983b0c277dc765258e78f5d9b8912d75b94486b3c9479494bd7aca0",
    "@nested": "0c563da36d9629416368aac76a4eb1cd2cd6d4cc380606ab2afd3e9b0d0170ba",
    "@relations": "1b39e4101692b98ddacb75e51cf05946b6c6e46ddbceb65556a1cd8dc78fa44b",
    "@v1": "6d2b198c0983b0c277dc765258e78f5d9b8912d75b94486b3c9479494bd7aca0",  # = @flat
}


@pytest.mark.parametrize(("name", "data", "ref"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_decoded_records_keep_their_golden_keys(name: str, data: bytes, ref: str) -> None:
    out = Decoder(now=lambda: NOW).decode_many([RawRecord(data, "acme", "test", 1, 1, NOW)])[0]
    assert isinstance(out, Record), out
    assert out.dedupe_key.hex() == KEYS[ref]
    assert dedupe_key(out.body).hex() == KEYS[ref]  # the slow path's function agrees
    slow = Decoder(now=lambda: NOW)._decode(RawRecord(data, "acme", "test", 1, 1, NOW), NOW + 1)
    assert isinstance(slow, Record) and slow.dedupe_key.hex() == KEYS[ref]


def test_the_canonical_bytes_of_a_flat_body() -> None:
    """What the flat record's key is the SHA-256 of (readable when a key above changes)."""
    out = Decoder(now=lambda: NOW).decode_many([RawRecord(GOLDEN[0][1], "acme", "t", 1, 1, NOW)])[0]
    assert isinstance(out, Record)
    assert orjson.dumps(out.body, option=orjson.OPT_SORT_KEYS) == (
        b'{"attributes":{"amount":12.5,"currency":"EUR","status":"new"},"deleted":false,'
        b'"entity_id":"o-1","entity_type":"order","occurred_at":"2024-05-01T11:00:00Z",'
        b'"priority":"normal","relations":[],"revision":7,"schema_version":3,"tenant_id":"acme"}'
    )
