"""The one way this service writes a point in time for people and JSON: ISO 8601 in UTC with
a `Z`, to the second, e.g. `2025-01-01T00:00:00Z` (the runbook's form), in /health/detailed,
checkpoints, CLI output and tool reports alike. Exact times stay numbers where they are
stored (epoch seconds, timestamptz); this is how they are shown."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def iso(when: float | datetime) -> str: ...


@overload
def iso(when: None) -> None: ...


def iso(when: float | datetime | None) -> str | None:
    """Epoch seconds or a datetime (naive = UTC) as ISO 8601 UTC with `Z`, the fraction of a
    second cut off; None stays None."""
    if when is None:
        return None
    if isinstance(when, datetime):
        dt = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    else:
        dt = datetime.fromtimestamp(when, UTC)
    return dt.isoformat(timespec="seconds").replace("+00:00", "Z")
