"""ingest.timefmt.iso: the one timestamp format (ISO 8601, UTC, to the second, `Z`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from ingest.timefmt import iso

FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
# whole microseconds within years 1970..2200: what a float epoch time carries exactly
micros = st.integers(0, 7_258_118_400 * 10**6)


def at(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


@given(micros)
def test_epoch_seconds_are_written_to_the_second_in_utc_with_z(us: int) -> None:
    dt = at(us)
    text = iso(dt.timestamp())
    assert FORMAT.fullmatch(text)
    assert datetime.fromisoformat(text) == dt.replace(microsecond=0)  # cut, never rounded up


@given(micros, st.integers(-14 * 60, 14 * 60))
def test_datetimes_in_any_zone_are_written_in_utc(us: int, offset_minutes: int) -> None:
    dt = at(us)
    local = dt.astimezone(timezone(timedelta(minutes=offset_minutes)))
    assert iso(local) == iso(dt) == iso(dt.replace(tzinfo=None)) == iso(dt.timestamp())


def test_examples_and_none() -> None:
    assert iso(1735689600.0) == "2025-01-01T00:00:00Z"
    assert iso(1735689600.75) == "2025-01-01T00:00:00Z"
    assert iso(None) is None
