"""schema_version 2 -> 3: v3 added `priority`, `relations` and a first-class `deleted` flag.

v2 senders marked tombstones with an `attributes._deleted` boolean; it moves to `deleted`.
Every other field keeps its name, so the v3 schema reports any other problem at the same path.
"""

from __future__ import annotations

from typing import Any

from ingest.schema import DriftError, json_type


def v2_to_v3(body: dict[str, Any]) -> dict[str, Any]:
    if "attributes" not in body:
        raise DriftError(
            "required",
            "$.attributes",
            "object",
            "missing",
            "required field 'attributes' is missing from a schema_version 2 record",
        )
    attributes = body["attributes"]
    if not isinstance(attributes, dict):
        found = json_type(attributes)
        raise DriftError(
            "type", "$.attributes", "object", found, f"'attributes' is {found}, expected object"
        )
    out = {**body, "schema_version": 3, "priority": "normal", "relations": [], "deleted": False}
    if "_deleted" in attributes:
        attributes = dict(attributes)
        deleted = attributes.pop("_deleted")
        if not isinstance(deleted, bool):
            found = json_type(deleted)
            raise DriftError(
                "type",
                "$.attributes._deleted",
                "boolean",
                found,
                f"'attributes._deleted' is {found}, expected boolean",
            )
        out["attributes"] = attributes
        out["deleted"] = deleted
    return out
