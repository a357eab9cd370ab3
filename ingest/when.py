"""Points in time as operators type them: ISO 8601 (naive = UTC) or an age like 30m, 2h, 7d."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(value: str, *, future: bool = False) -> datetime:
    """Raises ValueError with a sentence that says what is accepted. An age counts back from
    now, or forward with `future` (an expiry: 90d = ninety days from now)."""
    m = _RELATIVE.match(value.strip())
    if m:
        delta = timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
        return datetime.now(UTC) + (delta if future else -delta)
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"'{value}' is neither an ISO date-time nor an age like 30m, 2h, 7d"
        ) from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
