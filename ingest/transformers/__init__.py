"""Upgrading records from older `schema_version`s, one explicit step at a time.

Each step is a pure function from version N to N+1; `upgrade` chains them. The registry is a
plain dict (no import-time registration), so the supported versions are readable right here.
Steps raise `DriftError` (with the JSON path) for a shape they cannot read, never KeyError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ingest.schema import DriftError, json_type
from ingest.transformers.v1_to_v2 import v1_to_v2
from ingest.transformers.v2_to_v3 import v2_to_v3

CURRENT_VERSION = 3

UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: v1_to_v2,
    2: v2_to_v3,
}


def upgrade(body: dict[str, Any]) -> dict[str, Any]:
    """The body at CURRENT_VERSION (the same object when it already is)."""
    version = body.get("schema_version")
    if type(version) is not int or not 1 <= version <= CURRENT_VERSION:
        found = "missing" if "schema_version" not in body else version
        if "schema_version" in body and type(version) is not int:
            found = json_type(version)
        raise DriftError(
            "unknown_version",
            "$.schema_version",
            f"integer 1..{CURRENT_VERSION}",
            found,
            f"schema_version {found!r} is not one this service reads (1..{CURRENT_VERSION})",
        )
    while version < CURRENT_VERSION:
        body = UPGRADES[version](body)
        version += 1
    return body
