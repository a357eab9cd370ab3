"""The decoder's compiled fast path (ingest_native/, Rust) against the pure-Python one.

The compiled path must give byte for byte what the Python path gives: the same `Record`
(body, canonical bytes, dedupe key, fields) or the same `DecodeFailure`, for any bytes. Where
this usually breaks: float text, key order, string escapes, big integers, repeated keys;
each has generated inputs here. Both decoders run in this process: `Decoder(native=False)` is
the Python path the service runs without the extension (INGEST_NO_EXTENSION=1, or not built).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import struct
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ingest.pipeline.decode as decode_module
from ingest.pipeline.decode import DecodeFailure, Decoder
from ingest.records import RawRecord, Record
from ingest.sinks.postgres import _when
from ingest.sinks.sqlite import SQLiteSink
from tests.unit.test_decode import NOW, good
from tests.unit.test_decode_fast import mutated, values

native = pytest.importorskip("ingest_native", reason="the compiled extension is not built")

COMPILED = Decoder(now=lambda: NOW, sqlite_rows=True)
PYTHON = Decoder(now=lambda: NOW, native=False)


def raw_of(data: bytes, tenant: str = "acme") -> RawRecord:
    return RawRecord(data, tenant, "test", 1, 1, NOW)


def identical(a: Any, b: Any) -> None:
    """The same result, types and bytes included (`1 == 1.0 == True` in a dict compare)."""
    assert type(a) is type(b), (a, b)
    if isinstance(b, Record):
        assert a.dedupe_key == b.dedupe_key
        assert orjson.dumps(a.body, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
            b.body, option=orjson.OPT_SORT_KEYS
        )
        assert list(a.body) == list(b.body)
        assert orjson.dumps(a.body["attributes"]) == orjson.dumps(b.body["attributes"])  # order
        for name in ("tenant", "entity_type", "entity_id", "revision", "deleted", "priority"):
            x, y = getattr(a, name), getattr(b, name)
            assert (type(x), x) == (type(y), y), name
        assert a.entity_key == b.entity_key
        assert a.raw == b.raw
        assert b.copy_row is None  # the Python path leaves the sink's row to the sink
        assert a.copy_row is None or a.copy_row == copy_row_of(b), (a.copy_row, b.body)
        assert b.sqlite_row is None
        if a.sqlite_row is not None:  # the sink's row_of of the Python record, types too
            assert repr((*a.sqlite_row, 0.0)) == repr(SQLiteSink.row_of(b, 0.0)), b.body
    else:
        assert (a.reason, a.detail) == (b.reason, b.detail)
        assert repr(a.body) == repr(b.body)  # types and order too


def copy_row_of(rec: Record) -> bytes | None:
    """The Postgres sink's row of `rec` in binary COPY format, written the plain way from the
    Python path's record: what the compiled decoder's `Record.copy_row` must be. JSON columns
    as jsonb's version byte and the sorted text (jsonb keeps no key order)."""
    when = _when(rec.body["occurred_at"])
    if when is None:
        return None

    def field(data: bytes) -> bytes:
        return struct.pack(">i", len(data)) + data

    out = b"".join(field(s.encode()) for s in (rec.tenant, rec.entity_type, rec.entity_id))
    out += field(struct.pack(">q", rec.revision)) + field(bytes([rec.deleted]))
    out += field(struct.pack(">q", when[0]))
    for value in (rec.body["attributes"], rec.body["relations"]):
        if rec.deleted:
            out += struct.pack(">i", -1)
        else:
            out += field(b"\x01" + orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
    return out + field(rec.dedupe_key)


def both_paths(lines: list[bytes], tenant: str = "acme") -> None:
    raws = [raw_of(line, tenant) for line in lines]
    # twice: the first batch meets each occurred_at for the first time (Python's part), the
    # second finds it remembered (the compiled path finishes the record itself)
    for _ in range(2):
        for a, b in zip(COMPILED.decode_many(raws), PYTHON.decode_many(raws), strict=True):
            identical(a, b)


def test_the_service_runs_the_compiled_path_when_it_is_built() -> None:
    assert COMPILED.path == "compiled"
    assert PYTHON.path == "python"
    attributes = {"amount": 1.5, "currency": "EUR"}  # an email's format is Python's to check
    raws = [raw_of(orjson.dumps(good(entity_id=f"o-{i}", attributes=attributes))) for i in range(3)]
    COMPILED.decode_many(raws)
    got = native.decode_records(raws, Record, COMPILED._times, NOW + 86400, 1 << 20)
    assert all(type(r) is Record for r in got)  # finished in Rust, not handed back


def test_a_compiled_record_leaves_the_cycle_collector_out() -> None:
    """A finished compiled record adds no object to the collector's lists (each cost ~0.2 µs
    of generation-0 collections in the embedded pod): it holds no body until one is read
    (`Record.body`), and its entity key and SQLite row are untracked; the same record from
    the Python path is tracked. The body, once read, is the Python path's."""
    rel = [{"type": "OWNS", "target_type": "account", "target_id": "a-1"}]
    flat = {"amount": 1.5, "currency": "EUR"}  # an email's format is Python's to check
    bodies = [
        good(entity_id=f"o-{i}", attributes=flat, relations=r) for i, r in enumerate([[], rel])
    ]
    raws = [raw_of(orjson.dumps(body)) for body in bodies]
    COMPILED.decode_many(raws)  # the first batch meets occurred_at (Python finishes it)
    for rec in COMPILED.decode_many(raws):
        assert isinstance(rec, Record) and rec.sqlite_row is not None
        assert rec._body is None  # not built: nothing on the sinks' path reads it
        assert [gc.is_tracked(part) for part in (rec.entity_key, rec.sqlite_row)] == [False] * 2
        assert rec.body == PYTHON.decode(rec.raw).body  # type: ignore[union-attr]
        assert rec._body is rec.body  # built once, then kept
    python = PYTHON.decode(raws[1])
    assert isinstance(python, Record) and gc.is_tracked(python.body)


def built_when_read_is_built_at_once(body: dict[str, Any]) -> bool:
    """`Record.body` of a compiled record (built from its bytes on first read) is the body the
    compiled path builds at once for a record it hands to Python (here: a route of another
    tenant): the same keys, values, types and order, nested ones included. False when the
    compiled path does not finish the record (Python decodes it: no body is left out)."""
    attributes = body.get("attributes")
    if isinstance(attributes, dict):  # an email's format is Python's to check
        body = {**body, "attributes": {k: v for k, v in attributes.items() if k != "email"}}
    finished_all = True
    for line in spellings(body):
        finished = native.decode_records([raw_of(line)], Record, {}, NOW + 86400, 1 << 20)[0]
        handed = native.decode_records([raw_of(line, "other")], Record, {}, NOW + 86400, 1 << 20)
        if type(finished) is not Record:
            finished_all = False
            continue
        assert finished._body is None
        assert type(handed[0]) is tuple
        assert repr(finished.body) == repr(handed[0][0])
        eager_is_lazy(line)
    return finished_all


def eager_is_lazy(line: bytes) -> None:
    """A record finished with its body built at once (`bodies`, for routes whose sinks read
    it) is the record finished without it, whose body is built from the bytes when read: the
    same body (keys, values, types, order, nested ones too) and the same fields."""
    raws = [raw_of(line)]
    lazy = native.decode_records(raws, Record, {}, NOW + 86400, 1 << 20, True, True)[0]
    eager = native.decode_records(raws, Record, {}, NOW + 86400, 1 << 20, True, True, False, True)
    eager = eager[0]
    if type(lazy) is not Record:
        assert repr(eager) == repr(lazy)  # the same tuple (or None) for Python to finish
        return
    assert type(eager) is Record and eager._body is not None and lazy._body is None
    assert repr(eager._body) == repr(lazy.body)
    for name in Record.__struct_fields__:
        if name != "_body":
            assert getattr(eager, name) == getattr(lazy, name), name


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_a_body_built_when_read_is_the_one_built_at_once(body: dict[str, Any]) -> None:
    built_when_read_is_built_at_once(body)


def test_a_body_built_when_read_is_the_one_built_at_once_for_every_part() -> None:
    rel = {"target_id": "c-1", "type": "OWNS", "target_type": "customer"}  # not in sorted order
    for body in (
        good(relations=[rel, {**rel, "target_id": "c-\u00e9"}]),
        good(attributes={"b": 1, "a": {"d": [1.5, None, 2**64 - 1], "c": True}, "": "é"}),
        good(attributes={"s": 'quote " back \\ ctl \u0000 😀', "n": -(2**63), "f": -0.0}),
        good(priority="low", deleted=True),
        {k: v for k, v in good().items() if k not in ("priority", "relations", "deleted")},
    ):
        assert built_when_read_is_built_at_once(body), body


def test_a_compiled_record_carries_its_postgres_row() -> None:
    """The common record (and a tombstone) comes with the sink's binary COPY row, on the
    first batch (Python finishes the checks) and on the next (Rust finishes them)."""
    bodies = [
        good(entity_id=f"o-{i}", occurred_at=when, deleted=i == 2)
        for i, when in enumerate(
            ["2024-05-01T11:00:00Z", "2024-05-01T11:00:00.123+02:00", "2024-04-30T01:02:03.5-05:30"]
        )
    ]
    raws = [raw_of(orjson.dumps(body)) for body in bodies]
    for _ in range(2):
        for a, b in zip(COMPILED.decode_many(raws), PYTHON.decode_many(raws), strict=True):
            assert isinstance(a, Record) and isinstance(b, Record)
            assert a.copy_row is not None and a.copy_row == copy_row_of(b)


def test_a_compiled_record_carries_its_sqlite_row_when_asked() -> None:
    """With `sqlite_rows` every compiled record (tombstones, relations, non-ASCII, attribute
    keys out of order too) carries the SQLite sink's row but its updated_at, the one `row_of`
    builds from the Python path's record; without it, none."""
    rel = [{"type": "OWNS", "target_type": "account", "target_id": "a-1"}]
    bodies = [
        good(entity_id="o-0"),
        good(entity_id="o-1", relations=rel, attributes={"name": "é😀", "amount": 1.0}),
        good(entity_id="o-2", deleted=True, relations=rel),
    ]
    raws = [raw_of(orjson.dumps(body)) for body in bodies]
    plain = Decoder(now=lambda: NOW)
    for _ in range(2):
        python = PYTHON.decode_many(raws)
        for a, b, c in zip(
            COMPILED.decode_many(raws), python, plain.decode_many(raws), strict=True
        ):
            assert isinstance(a, Record) and isinstance(b, Record) and isinstance(c, Record)
            assert a.sqlite_row is not None and c.sqlite_row is None
            assert repr((*a.sqlite_row, 1.0)) == repr(SQLiteSink.row_of(b, 1.0))
    assert COMPILED.decode_many(raws)[2].sqlite_row[6] is None  # type: ignore[union-attr]


_RFC3339 = re.compile(
    r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
)


@st.composite
def times(draw: st.DrawFn) -> str:
    """RFC 3339-ish text, right and slightly wrong (what `_when` takes and refuses)."""
    when = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
    digits = draw(st.integers(0, 8))
    fraction = "".join(
        draw(st.lists(st.sampled_from("0123456789"), min_size=digits, max_size=digits))
    )
    offset = draw(
        st.one_of(
            st.sampled_from(
                ["Z", "z", "+00:00", "-00:00", "+05:30", "-08:00", "+14:00", "", "+0530"]
            ),
            st.builds(
                "{}{:02d}:{:02d}".format,
                st.sampled_from("+-"),
                st.integers(0, 25),
                st.integers(0, 61),
            ),
        )
    )
    sep = draw(st.sampled_from(["T", "T", "T", " ", "t"]))
    text = when.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + ("." + fraction if digits else "") + offset
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text("0123456789:-+.TZ ", max_size=2)) + text[at + 1 :]
    return text


@settings(max_examples=2000, deadline=None)
@given(times())
@example("2000-01-01T00:00:00Z")
@example("0001-01-01T00:00:00+23:59")
@example("9999-12-31T23:59:59.999999-23:59")
@example("2024-02-29T12:00:00Z")
@example("2023-02-29T12:00:00Z")
@example("2026-12-02T06:00:00.1234567Z")
def test_the_compiled_time_is_the_sinks(text: str) -> None:
    """`copy_row`'s occurred_at: `_when`'s value, or None (the sink then encodes the batch
    itself); never a value `_when` does not give. Plain RFC 3339 is always read."""
    got = native.timestamptz_micros(text)
    want = _when(text)
    if got is not None:
        assert want is not None and got == want[0], (text, got, want)
    if want is not None and _RFC3339.fullmatch(text):
        assert got is not None, text


@st.composite
def hostile_times(draw: st.DrawFn) -> str:
    """Text near a date-time: any year, month, day, hour, minute, second (out of range too),
    separators, fractions of any length, offsets, with a character or two changed."""
    parts = [
        f"{draw(st.integers(0, 10000)):04d}",
        draw(st.sampled_from("--/")),
        f"{draw(st.integers(0, 13)):02d}-{draw(st.integers(0, 32)):02d}",
        draw(st.sampled_from(["T", "T", "t", " ", "_"])),
        f"{draw(st.integers(0, 25)):02d}:{draw(st.integers(0, 61)):02d}",
        f":{draw(st.integers(0, 61)):02d}",
    ]
    digits = draw(st.integers(0, 12))
    if digits:
        parts.append(draw(st.sampled_from("..,")) + draw(st.text("0123456789", min_size=digits,
                                                                  max_size=digits)))
    parts.append(
        draw(
            st.one_of(
                st.sampled_from(["Z", "z", "", "+00:00", "-00:00", " Z", "+0100", "+01"]),
                st.builds(
                    "{}{:02d}:{:02d}".format,
                    st.sampled_from("+-"),
                    st.integers(0, 25),
                    st.integers(0, 61),
                ),
            )
        )
    )
    text = "".join(parts)
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 1))
        text = text[:at] + draw(st.text("0123456789:-+.TtZz \u0660\uff10é", max_size=2)) + text[
            at + cut :
        ]
    return text


@settings(max_examples=3000, deadline=None)
@given(st.one_of(times(), hostile_times()))
@example("2024-05-02T12:00:00.000001Z")
@example("1969-12-31T23:59:59.999999Z")
@example("9999-12-31T23:59:59.999999-23:59")
@example("0001-01-01T00:00:00.0000005+23:59")
@example("1600-02-29T11:00:00.1234567Z")
@example("2300-05-01T11:00:00.999999999-05:30")
@example("2024-05-01T11:00:00.5+01:30")
@example("2024-05-01t11:00:00.1234567+01:00")
@example("2024-05-01T11:00:00.1234567z")
@example("2024-05-01 11:00:00Z")
@example("2024-06-30T23:59:60Z")
@example("2024-05-01T11:00:00.Z")
@example("2024-05-01T11:00:00,5Z")
@example("2024-05-01T11:00:00.\u0665Z")
def test_a_time_not_seen_before_is_read_in_rust_as_python_reads_it(text: str) -> None:
    """An occurred_at the decoder has not remembered is read by the compiled path itself
    (a real feed's times are mostly distinct, and a miss costs the batch's facts): the very
    seconds `Decoder._time_of` gives, and None exactly where Python refuses it (the record
    then goes to Python, which says why)."""
    got = native.occurred_unix_seconds(text)
    want = PYTHON._time_of(text)
    assert got == (None if math.isinf(want) else want), text


def test_distinct_times_are_finished_by_the_compiled_path() -> None:
    """A batch whose every record has its own occurred_at is finished in Rust, facts and all,
    and gives what the Python path gives; one 24 h ahead is still refused as in the future."""
    decoder = Decoder(now=lambda: NOW, sqlite_rows=True)
    attributes = {"amount": 1.5, "currency": "EUR"}  # an email's format is Python's to check

    def line(entity_id: str, seconds: float) -> RawRecord:
        body = good(entity_id=entity_id, occurred_at=_iso(seconds), attributes=attributes)
        return raw_of(orjson.dumps(body))

    past = [line(f"o-{i}", NOW - 3600 - i * 1.5) for i in range(300)]
    got, facts = decoder.decode_batch(past)
    assert facts is not None
    assert not decoder._times  # nothing went through Python's reading of the time
    for a, b in zip(got, PYTHON.decode_many(past), strict=True):
        identical(a, b)
    ahead = [line("f-1", NOW + 86400 + 0.000001), line("f-2", NOW + 86400)]
    got, facts = decoder.decode_batch(ahead)
    assert facts is None
    assert isinstance(got[0], DecodeFailure) and isinstance(got[1], Record)
    for a, b in zip(got, PYTHON.decode_many(ahead), strict=True):
        identical(a, b)


def test_every_time_python_reads_is_finished_by_the_compiled_path() -> None:
    """Times past the plain spelling that Python reads (7 or 9 fraction digits, as .NET and
    Go write them; a lowercase `t`; years outside 1685-2255) are read in Rust too: the batch
    is finished with its facts, nothing goes through Python's reading, the records are the
    Python path's (copy_row only where `_when` gives one)."""
    decoder = Decoder(now=lambda: NOW, sqlite_rows=True)
    attributes = {"amount": 1.5, "currency": "EUR"}  # an email's format is Python's to check
    spellings = [
        "2024-05-01T11:00:00.1234567Z",
        "2024-05-01T11:00:00.123456789+01:00",
        "2024-05-01t11:00:00.5-05:30",
        "1600-02-29T11:00:00Z",
        "0001-01-01T00:00:00.0000005+23:59",
        "1500-05-01t11:00:00.999999999-00:00",
    ]
    raws = [
        raw_of(orjson.dumps(good(entity_id=f"o-{i}", occurred_at=when, attributes=attributes)))
        for i, when in enumerate(spellings)
    ]
    got, facts = decoder.decode_batch(raws)
    assert facts is not None
    assert not decoder._times
    for a, b in zip(got, PYTHON.decode_many(raws), strict=True):
        identical(a, b)
    assert [a.copy_row is not None for a in got] == [False, False, True, True, False, False]  # type: ignore[union-attr]


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def test_the_compiled_time_is_exact_at_the_ends() -> None:
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    for when in (
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ):
        text = when.isoformat().replace("+00:00", "Z")
        assert native.timestamptz_micros(text) == (when - epoch) // timedelta(microseconds=1)


def spellings(body: dict[str, Any]) -> list[bytes]:
    """One body as different JSON texts: escapes, whitespace, key order."""
    text = json.dumps(body, ensure_ascii=False)
    return [
        text.encode("utf-8", "surrogatepass"),
        json.dumps(body).encode(),  # every non-ASCII character as \\u escapes
        json.dumps(body, indent=1, sort_keys=True).encode("utf-8", "surrogatepass"),
    ]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
@example(good(attributes={"amount": 2**64}))
@example(good(attributes={"big": 2**64 - 1, "small": -(2**63), "over": -(2**63) - 1}))
@example(good(attributes={"f": [1e16, 1e15, 1.5e-7, 1e-5, -0.0, 5e-324, 1.7976931348623157e308]}))
@example(good(attributes={"s": 'quote " back \\ ctl \u0000\u001f\u007f \u2028 😀 é'}))
@example(good(attributes={"é": 1, "e": 2, "Z": 3, "": 4, "😀": 5, "ÿ": 6}))
@example(good(revision=2**63 - 1))
@example(good(relations=[{"type": "OWNS", "target_type": "customer", "target_id": "c-1"}]))
@example(good(priority="low", deleted=True, relations=[]))
@example(good(entity_id="x" * 256))
@example(good(entity_id="é" * 256))
@example(good(entity_id="é" * 257))
def test_compiled_and_python_paths_give_identical_records(body: dict[str, Any]) -> None:
    both_paths(spellings(body))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.text(max_size=4), max_size=4),
    st.sampled_from(["attributes", "relations", "top", "nested"]),
)
def test_repeated_keys_give_the_python_answer(keys: list[str], where: str) -> None:
    """A key sent twice: msgspec keeps the last; the compiled path hands it to Python."""
    members = ", ".join(f"{json.dumps(k)}: {i}" for i, k in enumerate(keys + keys[:1]))
    base = json.dumps(good(tenant_id="acme"))
    if where == "attributes":
        line = base.replace('"attributes": {', '"attributes": {' + members + ", ", 1)
    elif where == "nested":
        line = base.replace('"attributes": {', '"attributes": {"n": {' + members + "}, ", 1)
    elif where == "relations":
        twice = '{"type": "OWNS", "type": "OWNS", "target_type": "c", "target_id": "1"}'
        line = base[:-1] + f', "relations": [{twice}]}}'
    else:
        line = base[:-1] + ', "revision": 8}'
    both_paths([line.replace("{, ", "{").encode()])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 200))
def test_damaged_bytes_give_the_same_dlq_reason(junk: bytes, at: int) -> None:
    line = orjson.dumps(good())
    both_paths([line[:at] + junk + line[at:], junk, line[:at]])


@settings(max_examples=1000, deadline=None)
@given(values, st.booleans())
@example({"a": [1e16, 1e-7, 0.1, 1e21, 123456789.125, 1e-5, 2.5e-6]}, True)
@example({"a": [70368744177664.12, -70368744177664.12, 1125899906842624.2]}, False)  # ties
@example({'\u0000\n\t"\\/\u007f\u2028': "\ud83d\ude00"}, False)
def test_canonical_bytes_are_orjsons(value: Any, ascii_only: bool) -> None:
    """Any JSON value: the compiled canonical bytes are orjson's (OPT_SORT_KEYS) of what
    msgspec decodes, or None (the Python path then runs); None only where it must be."""
    text = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    got = native.canonical_json(text)
    try:
        want = orjson.dumps(msgspec.json.decode(text), option=orjson.OPT_SORT_KEYS)
    except (msgspec.DecodeError, TypeError, orjson.JSONEncodeError):
        assert got is None
        return
    if got is None:  # handed over: only for what the compiled path does not take
        assert (
            any(not (-(2**63) <= n <= 2**64 - 1) for n in _ints(value))
            or "\\ud8" in text.decode("utf-8", "surrogatepass").lower()
        ), text
    else:
        assert got == want


def _ints(value: Any) -> list[int]:
    if type(value) is int:
        return [value]
    if isinstance(value, list):
        return [n for v in value for n in _ints(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _ints(v)]
    return []


def test_without_the_extension_the_python_path_runs_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("INGEST_NO_EXTENSION", "1")
    decode, why, _ = decode_module._load_native()
    assert decode is None and "INGEST_NO_EXTENSION" in why
    monkeypatch.delenv("INGEST_NO_EXTENSION")
    monkeypatch.setitem(sys.modules, "ingest_native", None)  # as if it were not built
    decode, why, _ = decode_module._load_native()
    assert decode is None and "not installed" in why
    monkeypatch.setattr(decode_module, "_NATIVE", None)
    monkeypatch.setattr(decode_module, "_NATIVE_MISSING", why)
    monkeypatch.setattr(decode_module, "_logged", set())
    with caplog.at_level(logging.INFO, logger="ingest.pipeline.decode"):
        decoder = Decoder(now=lambda: NOW)
    assert decoder.path == "python"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("pure-Python fast path" in r.getMessage() for r in warned), caplog.text
    record = decoder.decode(raw_of(orjson.dumps(good())))
    assert isinstance(record, Record)
    identical(record, PYTHON.decode(raw_of(orjson.dumps(good()))))


def test_another_schema_turns_the_compiled_path_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_module, "_NATIVE_SCHEMA", "0" * 64)
    assert Decoder(now=lambda: NOW).path == "python"


def test_startup_log_names_the_compiled_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(decode_module, "_logged", set())
    with caplog.at_level(logging.INFO, logger="ingest.pipeline.decode"):
        assert Decoder(now=lambda: NOW).path == "compiled"
    assert "decoder: compiled fast path (ingest_native)" in caplog.text


def test_failures_from_the_compiled_batch_match(tmp_path: Any) -> None:
    lines = [orjson.dumps(good(entity_id=f"o-{i}")) for i in range(5)]
    lines += [b"{", b"[]", orjson.dumps(good(tenant_id="other")), orjson.dumps(good(revision=-1))]
    lines += [orjson.dumps(good(attributes={"amount": -1})), orjson.dumps(good(schema_version=1))]
    both_paths(lines)
    assert isinstance(COMPILED.decode_many([raw_of(b"{")])[0], DecodeFailure)


def test_without_a_postgres_sink_no_row_is_written() -> None:
    """`postgres_rows=False` (the factory's choice when no sink is Postgres): the same records,
    without the row nothing would send."""
    decoder = Decoder(now=lambda: NOW, postgres_rows=False)
    raws = [raw_of(orjson.dumps(good(entity_id=f"o-{i}"))) for i in range(3)]
    for _ in range(2):
        for a, b in zip(decoder.decode_many(raws), COMPILED.decode_many(raws), strict=True):
            assert isinstance(a, Record) and isinstance(b, Record)
            assert a.copy_row is None and b.copy_row is not None
            identical(a, PYTHON.decode(a.raw))


def test_a_batch_across_turns_is_decoded_in_order() -> None:
    """A batch decoded over several turns (`TURN` lines a turn, 256) gives each raw record
    its own result, in order: valid records, failures and records left to Python mixed at
    positions that fall on both sides of the turns' edges."""
    lines = []
    for i in range(700):
        if i % 97 == 0:
            lines.append(b"{")  # unparseable: Python's to explain
        elif i % 89 == 0:
            lines.append(orjson.dumps(good(entity_id=f"o-{i}", tenant_id="other")))
        elif i % 83 == 0:
            lines.append(orjson.dumps(good(entity_id=f"o-{i}", attributes={"email": "a@b.c"})))
        else:
            lines.append(orjson.dumps(good(entity_id=f"o-{i}", revision=i)))
    both_paths(lines)
    raws = [raw_of(line) for line in lines]
    got = native.decode_records(raws, Record, COMPILED._times, NOW + 86400, 1 << 20)
    assert len(got) == len(raws)
    for raw, hit in zip(raws, got, strict=True):
        if type(hit) is Record:
            assert hit.raw is raw
        elif hit is not None:
            assert hit[2] == raw.data.split(b'"tenant_id":"')[1].split(b'"')[0].decode()


def test_other_threads_run_python_while_a_batch_is_decoded() -> None:
    """The parsing, checks and hashing run with the GIL released: a thread that needs it (as
    the SQLite threads do when their statements return, holding their file's writer lock)
    runs during one `decode_records` call, not only after it. With the GIL held through the
    call (the extension before), no wake-up of the thread falls inside the call."""
    lines = [orjson.dumps(good(entity_id=f"o-{i}", revision=i)) for i in range(40_000)]
    raws = [raw_of(line) for line in lines]
    native.decode_records(raws[:10], Record, COMPILED._times, NOW + 86400, 1 << 20)

    def wake(stamps: list[float], stop: threading.Event) -> None:
        while not stop.is_set():
            time.sleep(0.0002)
            stamps.append(time.perf_counter())

    inside = 0
    for _ in range(3):  # a loaded machine may not run the thread in one call's time
        stamps: list[float] = []
        stop = threading.Event()
        thread = threading.Thread(target=wake, args=(stamps, stop))
        thread.start()
        time.sleep(0.01)
        t0 = time.perf_counter()
        native.decode_records(raws, Record, COMPILED._times, NOW + 86400, 1 << 20)
        t1 = time.perf_counter()
        stop.set()
        thread.join()
        # a switch just before or after the call can place one or two stamps in [t0, t1]
        inside = sum(t0 < t < t1 for t in stamps)
        if inside >= 5:
            break
    assert inside >= 5, inside


def test_a_decoder_asked_for_bodies_builds_them_where_asked() -> None:
    """`Decoder(bodies=...)`: True builds every finished record's body at once, a callable
    those of the (tenant, entity_type) pairs it answers True for (asked once a batch a pair);
    the batch's facts and every other field are as without it."""
    flat = {"amount": 1.5, "currency": "EUR"}  # an email's format is Python's to check
    types = ["order", "invoice"]
    raws = [
        raw_of(orjson.dumps(good(entity_id=f"o-{i}", entity_type=types[i % 2], attributes=flat)))
        for i in range(6)
    ]
    asked: list[tuple[str, str]] = []

    def invoices(tenant: str, entity_type: str) -> bool:
        asked.append((tenant, entity_type))
        return entity_type == "invoice"

    for bodies in (True, invoices):
        lazy, lazy_facts = Decoder(now=lambda: NOW).decode_batch(raws)
        got, facts = Decoder(now=lambda: NOW, bodies=bodies).decode_batch(raws)
        assert facts == lazy_facts and facts is not None
        for a, b in zip(got, lazy, strict=True):
            assert isinstance(a, Record) and isinstance(b, Record) and b._body is None
            built = bodies is True or a.entity_type == "invoice"
            assert (a._body is not None) == built, (bodies, a.entity_type)
            assert repr(a.body) == repr(b.body)
    assert sorted(asked) == [("acme", "invoice"), ("acme", "order")]
