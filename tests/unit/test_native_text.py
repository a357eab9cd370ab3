"""The compiled decoder's shortcuts for text (ingest_native/src/lib.rs) give exactly what the
long way gives: a float's digits taken from its text as sent, strings scanned eight bytes at a
time and copied unchecked when the parser borrowed them, the batch's recent names. Each
shortcut is held to orjson's canonical bytes (or to refusing, where msgspec refuses) on the
inputs that would catch it taking a case it must not: 16 and 17 digits, subnormals, every
spelling of a number, every special byte at every place of an eight-byte word.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest.pipeline.decode import Decoder
from ingest.records import Record
from tests.unit.test_decode import NOW, good
from tests.unit.test_decode_native import PYTHON, identical, raw_of

native = pytest.importorskip("ingest_native", reason="the compiled extension is not built")


def orjsons(text: bytes) -> bytes | None:
    """What the compiled canonical bytes must be: orjson's (OPT_SORT_KEYS) of what msgspec
    reads, None where msgspec refuses the text."""
    try:
        return orjson.dumps(msgspec.json.decode(text), option=orjson.OPT_SORT_KEYS)
    except (msgspec.DecodeError, orjson.JSONEncodeError):
        return None


def spellings(f: float) -> list[str]:
    """The same number written many ways: shortest, with zeros after it, shifted into an
    exponent, with leading zeros, upper-case E, an explicit + (JSON has no leading zeros
    before the integer part, nor '.5')."""
    text = repr(f)
    if "e" in text or "E" in text:
        mantissa, exp = text.split("e")
        shift = int(exp)
    else:
        mantissa, shift = text, 0
    sign = "-" if mantissa.startswith("-") else ""
    mantissa = mantissa.lstrip("-")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0") or "0"
    point = len(whole) + shift - (len(whole + frac) - len((whole + frac).lstrip("0")))
    # digits with the decimal point after `point` of them: 0.ddd e point
    out = [text, f"{sign}0.{digits}e{point}", f"{sign}0.{digits}E{point:+d}"]
    out.append(f"{sign}{digits[0]}.{digits[1:] or '0'}000e{point - 1}")
    out.append(f"{sign}{digits}e{point - len(digits)}")
    if 0 <= point <= 20:
        whole_part = (digits[:point] + "0" * (point - len(digits[:point]))) or "0"
        out.append(f"{sign}{whole_part}.{digits[point:] or '0'}00")
    if -8 <= point < 0:
        out.append(f"{sign}0.{'0' * -point}{digits}")
    return out


@settings(max_examples=1500, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
@example(0.1 + 0.2)  # 17 digits
@example(1.0000000000000002)
@example(123456789012345.67)  # 17 digits
@example(12345678901234.56)  # 16 digits
@example(1234567890123.456)  # 16 digits
@example(5e-324)  # subnormal: "4e-324" reads as it too
@example(2.2250738585072014e-308)  # the least normal
@example(2.225073858507201e-308)  # the greatest subnormal
@example(1.7976931348623157e308)
@example(70368744177664.12)  # a tie Rust breaks the other way (half_to_even)
@example(1e16)
@example(1e-7)
@example(-0.0)
def test_a_float_sent_any_way_is_written_as_orjson_writes_it(f: float) -> None:
    for text in spellings(f):
        data = json.dumps({"a": [f]}).replace(repr(f), text, 1).encode()
        assert native.canonical_json(data) == orjsons(data), data


@pytest.mark.parametrize(
    "text",
    [
        "4e-324",  # a subnormal's other reading: not its shortest digits
        "3e-324",
        "7e-324",
        "2.225073858507201e-308",
        "1.00000000000000000000001",
        "1.0000000000000001",  # 17 digits that read as 1.0
        "0.30000000000000004",
        "0.1000000000000000055511151231257827",
        "9007199254740993",  # an integer: not a float at all
        "9007199254740993.0",
        "123456789012345.6",  # 16 digits
        "100000000000000000000000.0",
        "0.000001",
        "0.00001",
        "1e15",
        "1e16",
        "1E-5",
        "0e5",
        "-0.000e-3",
        "0.0000000000000000000000000000000000000000000000001",
    ],
)
def test_a_number_text_at_the_edges_is_written_as_orjson_writes_it(text: str) -> None:
    data = f'{{"a":{text},"b":[{text},-{text}]}}'.encode()
    assert native.canonical_json(data) == orjsons(data), data


SPECIALS = ['"', "\\", "\n", "\x01", "\x1f", "\x7f", "é", "😀", "/", "a"]


@pytest.mark.parametrize("special", SPECIALS)
def test_a_special_character_at_every_place_of_a_word(special: str) -> None:
    """Quotes, backslashes, control characters and non-ASCII at each of the first 24 places
    of a string and a key (the scan reads eight bytes at a time), escaped and raw."""
    for length in range(0, 25):
        for at in range(length + 1):
            text = "x" * at + special + "y" * (length - at)
            for data in (
                json.dumps({text: text}).encode(),  # escaped
                json.dumps({text: text}, ensure_ascii=False).encode(),  # raw where JSON allows
                ('{"k":"' + text + '"}').encode(),  # raw always: control characters refused
            ):
                assert native.canonical_json(data) == orjsons(data), data


@pytest.mark.parametrize("at", range(0, 18))
def test_bytes_that_are_not_utf8_are_refused_at_every_place(at: int) -> None:
    for bad in (b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf"):
        data = b'{"k":"' + b"x" * at + bad + b"y" * 9 + b'"}'
        assert native.canonical_json(data) is None, data
        assert orjsons(data) is None


def test_names_that_come_back_out_of_turn_are_the_right_ones() -> None:
    """A batch cycling through more tenants' entity types and priorities than the decoder's
    recent names hold: each record's strings are its own."""
    decoder = Decoder(now=lambda: NOW, sqlite_rows=True)
    kinds = ["order", "event", "ordex", "a", "b_1", "orders", "zzzzz"]
    priorities = ["low", "high", "normal"]
    bodies: list[dict[str, Any]] = [
        good(entity_id=f"o-{i}", entity_type=kinds[i * 7 % 5 + i % 3], priority=priorities[i % 3])
        for i in range(60)
    ]
    raws = [raw_of(orjson.dumps(body)) for body in bodies]
    for _ in range(2):
        for body, got, want in zip(
            bodies, decoder.decode_many(raws), PYTHON.decode_many(raws), strict=True
        ):
            assert isinstance(got, Record)
            assert (got.entity_type, got.priority) == (body["entity_type"], body["priority"])
            identical(got, want)


NAMES = ["order", "ordex", "odrer", "é", "e", "ÿ", "a" * 64, "a" * 63 + "b", "😀x", "ab", "a" * 65]
KINDS = ["order", "ordex", "odrer", "a" * 64, "a" * 63 + "b", "ab", "b"]
RELATIONS = ["OWNS", "OWNX", "ONWS", "A" * 64, "A" * 65, "AB"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.dictionaries(
                st.sampled_from(NAMES),
                st.one_of(
                    st.sampled_from(NAMES),
                    st.text(max_size=6),
                    st.lists(st.sampled_from(NAMES), max_size=2),
                ),
                max_size=6,
            ),
            st.lists(
                st.tuples(
                    st.sampled_from(RELATIONS), st.sampled_from(KINDS), st.sampled_from(NAMES)
                ),
                max_size=2,
            ),
            st.sampled_from(KINDS),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_a_batch_of_bodies_built_at_once_has_each_records_own_names(
    parts: list[tuple[dict[str, Any], list[tuple[str, str, str]], str]],
) -> None:
    """Bodies built in one call (`bodies`, for routes whose sinks read them) whose attribute
    keys, relation names, string values and entity types repeat, differ by one byte or only
    in length, and are not ASCII: each body is the one Python builds from its bytes. Attribute
    keys and relation names go through the decoder's map of names, the record's own names
    through its recent slots, and strings through the ASCII-at-size path."""
    bodies = [
        good(
            entity_id=f"o-{i}",
            entity_type=kind,
            attributes=attributes,
            relations=[{"type": t, "target_type": tt, "target_id": ti} for t, tt, ti in relations],
        )
        for i, (attributes, relations, kind) in enumerate(parts)
    ]
    raws = [raw_of(json.dumps(body, ensure_ascii=False).encode()) for body in bodies]
    got = native.decode_records(raws, Record, {}, NOW + 86400, 1 << 20, True, True, False, True)
    for body, rec, raw in zip(bodies, got, raws, strict=True):
        want = PYTHON.decode(raw)
        assert isinstance(rec, Record) and isinstance(want, Record), (rec, want)
        assert rec._body is not None
        assert repr(rec._body) == repr(want.body)
        assert (rec.entity_type, rec.priority) == (body["entity_type"], "normal")
        for name in Record.__struct_fields__:
            if name not in ("_body", "raw", "copy_row", "sqlite_row"):
                assert getattr(rec, name) == getattr(want, name), name
