"""The one way this service writes a point in time for people and JSON: ISO 8601 in UTC with
a `Z`, to the second, e.g. `2025-01-01T00:00:00Z` (the runbook's form), in /health/detailed,
checkpoints, CLI output and tool reports alike. Exact times stay numbers where they are
stored (epoch seconds, timestamptz); this is how they are shown. `parse_when` reads what
operators type: that form, any ISO 8601 (naive = UTC), or an age like 30m, 2h, 7d."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
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


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(value: str, *, future: bool = False) -> datetime:
    """Raises ValueError with a sentence that says what is accepted. An age counts back from
    now, or forward with `future` (an expiry: 90d = ninety days from now)."""
    m = _RELATIVE.match(value.strip())
    try:
        if m:
            delta = timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
            return datetime.now(UTC) + (delta if future else -delta)
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise ValueError(
            f"'{value}' is neither an ISO date-time nor an age like 30m, 2h, 7d"
        ) from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
