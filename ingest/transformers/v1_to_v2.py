"""schema_version 1 -> 2: v1 used short field names and epoch-seconds timestamps.

    v1: {"schema_version": 1, "tenant", "type", "id", "rev", "ts": <epoch seconds>, "data"}
    v2: {"schema_version": 2, "tenant_id", "entity_type", "entity_id", "revision",
         "occurred_at": <RFC 3339 UTC>, "attributes"}

`occurred_at` is written in one canonical form (`YYYY-MM-DDTHH:MM:SS[.ffffff]Z`, fraction
without trailing zeros) so a v3 sender using that form produces the same dedupe key.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ingest.schema import DriftError, ValueRuleError, json_type

# v1 field -> (v2 field, accepted JSON types)
_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tenant": ("tenant_id", ("string",)),
    "type": ("entity_type", ("string",)),
    "id": ("entity_id", ("string",)),
    "rev": ("revision", ("integer",)),
    "ts": ("occurred_at", ("integer", "number")),
    "data": ("attributes", ("object",)),
}
_KNOWN = frozenset(_FIELDS) | {"schema_version"}


def rfc3339(ts: float) -> str:
    """Epoch seconds as the canonical UTC `occurred_at` string."""
    try:
        moment = datetime.fromtimestamp(ts, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueRuleError(
            "range",
            "$.ts",
            "epoch seconds within years 1..9999",
            ts,
            f"ts {ts} is out of range: {exc}",
        ) from None
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def v1_to_v2(body: dict[str, Any]) -> dict[str, Any]:
    for name in body:
        if name not in _KNOWN:
            raise DriftError(
                "additionalProperties",
                f"$.{name}",
                "no such field in v1",
                json_type(body[name]),
                f"unknown field '{name}' in a schema_version 1 record",
            )
    out: dict[str, Any] = {"schema_version": 2}
    for old, (new, types) in _FIELDS.items():
        if old not in body:
            raise DriftError(
                "required",
                f"$.{old}",
                types[0],
                "missing",
                f"required field '{old}' is missing from a schema_version 1 record",
            )
        value = body[old]
        found = json_type(value)
        if found not in types:
            raise DriftError(
                "type", f"$.{old}", types[-1], found, f"'{old}' is {found}, expected {types[-1]}"
            )
        out[new] = value
    out["occurred_at"] = rfc3339(out["occurred_at"])
    return out
