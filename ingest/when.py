"""Points in time as operators type them: ISO 8601 (naive = UTC) or an age like 30m, 2h, 7d."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(value: str) -> datetime:
    """Raises ValueError with a sentence that says what is accepted."""
    m = _RELATIVE.match(value.strip())
    if m:
        return datetime.now(UTC) - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"'{value}' is neither an ISO date-time nor an age like 30m, 2h, 7d"
        ) from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
