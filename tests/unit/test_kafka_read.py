"""The Kafka source's per-message loop (`KafkaSource._to_batch`), without a broker.

The source reads only a record's tenant_id (msgspec, in C) and leaves the parse to the decoder,
which then takes its typed fast path once, instead of the source parsing every value into a
dict that sent the decoder down its slow path. Whatever the bytes, the records it yields must
decode to what the full parse gave: same tenant, same source-level rejects, and the same
Record (body, dedupe key) or the same failure from the decoder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson
from confluent_kafka import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import KafkaSourceConfig
from ingest.pipeline.decode import Decoder
from ingest.records import RawRecord, Record
from ingest.sources.kafka import KafkaSource, _Partition

MAX_BYTES = 400


def source(tenant: str | None = None) -> KafkaSource:
    src = KafkaSource(KafkaSourceConfig(topics=["t"], tenant=tenant), max_record_bytes=MAX_BYTES)
    src._parts = {("t", 0): _Partition(epoch=1)}
    return src


def message(value: bytes | None, offset: int, header: bytes | None) -> Any:
    headers = None if header is None else [("tenant", header)]
    return Message(topic="t", partition=0, offset=offset, value=value, headers=headers,
                   timestamp=(1, 1_735_689_600_000))  # fmt: skip


def parsed_first(value: bytes | None, header: str | None, cfg_tenant: str | None) -> RawRecord:
    """What the source yielded when it parsed every value with orjson (the reference)."""
    body: dict[str, Any] | None = None
    meta: dict[str, Any] = {}
    if value is not None and len(value) <= MAX_BYTES:
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            meta["reject"] = {"kind": "json", "message": f"not valid JSON: {exc}"}
        else:
            if type(parsed) is dict:
                body = parsed
    elif value is None:
        meta["reject"] = {"kind": "json", "message": "null value (a tombstone), not a record"}
    else:
        meta["reject"] = {"kind": "size", "message": "over"}
    tenant = header or (body.get("tenant_id") if body is not None else None)
    if type(tenant) is not str:
        tenant = cfg_tenant or "unknown"
    return RawRecord(value or b"", tenant, "kafka-main", 0, None, 0.0, body, meta)


def both_ways(
    batch: Sequence[tuple[bytes | None, bytes | None]], cfg_tenant: str | None
) -> list[tuple[RawRecord, Any, Any]]:
    """Each message as the source reads it and the decoder's verdict, beside the verdict on the
    same message parsed in full first (the reference); asserts the source kept the same
    bytes, tenant and source-level reject kind as the reference."""
    out = source(cfg_tenant)._to_batch([message(v, i, h) for i, (v, h) in enumerate(batch)])
    assert out is not None and len(out.records) == len(batch)
    decoder = Decoder()
    refs = [parsed_first(v, None if h is None else h.decode(), cfg_tenant) for v, h in batch]
    judged = []
    for raw, ref, g, w in zip(
        out.records, refs, decoder.decode_many(out.records), decoder.decode_many(refs),
        strict=True,
    ):
        assert (raw.data, raw.tenant) == (ref.data, ref.tenant)
        assert raw.meta.get("reject", {}).get("kind") == ref.meta.get("reject", {}).get("kind")
        judged.append((raw, g, w))
    return judged


def good(i: int, tenant: Any) -> dict[str, Any]:
    return {
        "schema_version": 3,
        "tenant_id": tenant,
        "entity_type": "customer",
        "entity_id": f"c-{i}",
        "revision": i + 1,
        "occurred_at": "2025-01-01T00:00:00Z",
        "attributes": {"name": f"n{i}"},
    }


tenants = st.one_of(
    st.sampled_from(["acme", "other"]), st.none(), st.integers(), st.text(max_size=5)
)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # integers of any size (the hostile ones included)


values = st.one_of(
    st.builds(lambda i, t: dumps(good(i, t)), st.integers(0, 1000), tenants),
    st.builds(lambda t: dumps({"tenant_id": t}), tenants),
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4).map(
        dumps
    ),
    st.sampled_from([b"[1, 2]", b"not json {", b"", b"{", b'"acme"', b"null", b"{}  x"]),
    st.binary(max_size=40),
    st.just(b'{"tenant_id": "acme", "pad": "' + b"x" * MAX_BYTES + b'"}'),
    st.none(),
)


@settings(max_examples=300, deadline=None)
@given(
    batch=st.lists(st.tuples(values, st.sampled_from([None, b"acme", b"hdr"])), min_size=1),
    cfg_tenant=st.sampled_from([None, "cfg"]),
)
def test_records_decode_as_when_the_source_parsed_every_value(
    batch: list[tuple[bytes | None, bytes | None]], cfg_tenant: str | None
) -> None:
    judged = both_ways(batch, cfg_tenant)
    assert [raw.position for raw, _, _ in judged] == [("t", 0, i) for i in range(len(batch))]
    for raw, g, w in judged:
        if isinstance(w, Record):
            assert isinstance(g, Record)
            assert (g.body, g.dedupe_key, g.tenant, g.entity_key) == (
                w.body,
                w.dedupe_key,
                w.tenant,
                w.entity_key,
            )
            assert raw.decoded is None  # parsed once, by the decoder's typed fast path
        else:
            assert not isinstance(g, Record)
            assert g.reason == w.reason


def test_a_valid_record_is_left_for_the_decoder_to_parse() -> None:
    out = source()._to_batch([message(orjson.dumps(good(1, "acme")), 0, None)])
    assert out is not None
    (raw,) = out.records
    assert (raw.tenant, raw.decoded, raw.meta) == ("acme", None, {})


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(900, 4000), st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]),
                          st.booleans()), min_size=1, max_size=4))  # fmt: skip
def test_deeply_nested_values_are_judged_never_raise(
    shapes: list[tuple[int, tuple[bytes, bytes], bool]],
) -> None:
    """msgspec raises RecursionError past ~1000 levels, even in fields it skips: such messages
    must not fail the batch (the runner would restart on the same message forever)."""
    src = KafkaSource(KafkaSourceConfig(topics=["t"]), max_record_bytes=1_048_576)
    src._parts = {("t", 0): _Partition(epoch=1)}
    values = []
    for depth, (open_, close), at_top in shapes:
        nest = open_ * depth + b"1" + close * depth
        values.append(nest if at_top else b'{"tenant_id":"acme","x":' + nest + b"}")
    out = src._to_batch([message(v, i, None) for i, v in enumerate(values)])
    assert out is not None and len(out.records) == len(values)


# Bytes that are not valid UTF-8 (a stray continuation byte, a truncated sequence, an overlong
# encoding, an encoded surrogate, past U+10FFFF), escapes and control characters JSON refuses,
# and valid non-ASCII for contrast. msgspec's tenant read skips every field but tenant_id
# without looking at its bytes; what it lets through must still be judged as the full parse did.
HOSTILE = st.sampled_from([
    b"\xff", b"\x80", b"\xc3", b"\xe2\x82", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
    b"\\ud800", b"\\udfff x", b"\\x", b"\x01", b"\x00", b"\xc3\xa9", "𝕏".encode(), b"\\u00e9",
]) | st.binary(min_size=1, max_size=4)  # fmt: skip
PLACES = ["skipped value", "skipped key", "skipped list", "attribute value", "attribute key"]


@st.composite
def hostile_values(draw: st.DrawFn) -> bytes:
    """A record (valid or not otherwise) with hostile bytes in fields the tenant read skips,
    the skipped field before or after tenant_id."""
    body = good(draw(st.integers(0, 1000)), draw(st.sampled_from(["acme", "other"])))
    if draw(st.booleans()):
        body = {"tenant_id": body["tenant_id"]}
    marks: list[bytes] = []
    for i, place in enumerate(draw(st.lists(st.sampled_from(PLACES), min_size=1, max_size=3))):
        mark = f"@@{i}@@"
        marks.append(draw(HOSTILE))
        if place == "skipped value":
            extra = {"note": mark}
        elif place == "skipped key":
            extra = {mark: 1}
        elif place == "skipped list":
            extra = {"tags": [1, {"k": [mark]}]}
        else:
            attrs = body.setdefault("attributes", {})
            attrs.update({"name": mark} if place == "attribute value" else {mark: "v"})
            continue
        body = {**extra, **body} if draw(st.booleans()) else {**body, **extra}
    raw = json.dumps(body).encode()
    for i, fragment in enumerate(marks):
        raw = raw.replace(f"@@{i}@@".encode(), fragment)
    return raw


@settings(max_examples=400, deadline=None)
@given(
    batch=st.lists(st.tuples(hostile_values(), st.sampled_from([None, b"acme"])), min_size=1,
                   max_size=5),
    cfg_tenant=st.sampled_from([None, "cfg"]),
)  # fmt: skip
def test_hostile_bytes_in_skipped_fields_are_judged_as_by_the_full_parse(
    batch: list[tuple[bytes, bytes | None]], cfg_tenant: str | None
) -> None:
    """Invalid UTF-8 (or an escape JSON refuses) where the tenant read does not look: the same
    tenant, the same source-level reject and the same decoder verdict (reason, or accepted)
    as when the source parsed every value in full; never an exception out of the batch."""
    for _, g, w in both_ways(batch, cfg_tenant):
        if isinstance(w, Record):
            assert isinstance(g, Record) and (g.body, g.dedupe_key) == (w.body, w.dedupe_key)
        else:
            assert not isinstance(g, Record)
            assert (g.reason, g.detail.get("kind")) == (w.reason, w.detail.get("kind"))


def test_the_first_reads_after_a_start_or_resume_ramp_up_to_the_batch_size() -> None:
    """After a start or a resume the pipeline behind the reader is empty: its first COPY and
    first commit wait for the first batch's read, admission and decode, which a small batch
    shortens. So the first reads are RAMP (1,000, 2,000, 4,000), then batch_size; a step at
    or over batch_size is skipped, and reads between two resumes are never short."""

    def sizes(src: KafkaSource, n: int) -> list[int]:
        src._held = [message(orjson.dumps(good(i, "acme")), i, None) for i in range(n)]
        out = []
        while src._held:
            batch = src._read()
            assert batch is not None
            out.append(len(batch.records))
        return out

    src = KafkaSource(KafkaSourceConfig(topics=["t"], batch_size=5000))
    src._parts = {("t", 0): _Partition(epoch=1)}
    src._ramp_up()
    assert sizes(src, 20_000) == [1000, 2000, 4000, 5000, 5000, 3000]
    assert sizes(src, 12_000) == [5000, 5000, 2000]  # no resume since: full batches
    src._ramp_up()
    assert sizes(src, 3500) == [1000, 2000, 500]
    assert sizes(src, 6000) == [5000, 1000]  # a short read was a step of its own
    small = KafkaSource(KafkaSourceConfig(topics=["t"], batch_size=1500))
    small._parts = {("t", 0): _Partition(epoch=1)}
    small._ramp_up()
    assert sizes(small, 5000) == [1000, 1500, 1500, 1000]
