"""The S3 client's timestamp parser (ingest/sources/s3.py `parse_timestamp`): the standard
library for S3's ISO 8601 form, botocore's own parser for the rest, the same instant either
way (LastModified is a record's event time and orders a listing)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import botocore.utils  # type: ignore[import-untyped]
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest.sources.s3 import parse_timestamp, plain_http

MOMENTS = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


def s3_form(moment: datetime, millis: bool) -> str:
    """As S3 (and SeaweedFS) write LastModified in a listing."""
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{moment.microsecond // 1000:03d}Z" if millis else "Z")


@given(moment=MOMENTS, millis=st.booleans())
def test_s3_timestamps_read_as_botocore_reads_them(moment: datetime, millis: bool) -> None:
    text = s3_form(moment, millis)
    ours = parse_timestamp(text)
    assert ours == botocore.utils.parse_timestamp(text)
    assert ours.utcoffset() is not None  # aware: .timestamp() is the instant, not local time


@given(moment=MOMENTS, hours=st.integers(-12, 12))
@example(moment=datetime(2026, 12, 2, 15, 20, 14, tzinfo=UTC), hours=0)
def test_other_forms_are_the_same_instant(moment: datetime, hours: int) -> None:
    shifted = moment.astimezone(timezone(timedelta(hours=hours))).replace(microsecond=0)
    for text in (
        shifted.isoformat(),  # with an offset
        shifted.strftime("%a, %d %b %Y %H:%M:%S GMT") if hours == 0 else shifted.isoformat(),
        shifted.replace(tzinfo=None).isoformat(),  # naive: botocore's call
        str(int(shifted.timestamp())),  # epoch seconds
    ):
        assert parse_timestamp(text) == botocore.utils.parse_timestamp(text), text


@given(moment=MOMENTS)
@example(moment=datetime(2026, 12, 2, 15, 20, 14, tzinfo=UTC))
def test_http_dates_read_as_botocore_reads_them(moment: datetime) -> None:
    """A GET's Last-Modified header (RFC 9110's IMF-fixdate), read by the standard library."""
    text = moment.replace(microsecond=0).strftime("%a, %d %b %Y %H:%M:%S GMT")
    ours = parse_timestamp(text)
    assert ours == botocore.utils.parse_timestamp(text)
    assert ours.utcoffset() is not None


@settings(max_examples=40, deadline=None)  # botocore's refusals are slow (~50 ms)
@given(
    text=st.from_regex(
        r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT", fullmatch=True
    )
)
def test_malformed_http_dates_go_to_botocore(text: str) -> None:
    """A date of that shape the standard library cannot read (a month 'Xyz', hour 99) is
    botocore's to read or refuse, as before."""
    try:
        expected = botocore.utils.parse_timestamp(text)
    except Exception as exc:  # botocore refuses it: so do we, the same way
        try:
            parse_timestamp(text)
        except Exception as ours:
            assert type(ours) is type(exc)
        else:
            raise AssertionError(f"{text!r} read, botocore refused it") from None
    else:
        assert parse_timestamp(text) == expected


def test_plain_http_endpoints_need_no_tls() -> None:
    assert plain_http("http://127.0.0.1:8333")
    assert plain_http("HTTP://minio:9000")
    assert not plain_http("https://s3.eu-west-1.amazonaws.com")
    assert not plain_http(None)  # AWS: https
