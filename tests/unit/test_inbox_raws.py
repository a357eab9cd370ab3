"""The inbox's RawRecords: a chunk of whole JSON lines comes from the reader as a LineRun and
is made in one comprehension, with one shared, read-only empty `meta` (`records.NO_META`)
and one shared position (`records.LinesAt`: the run's offsets by seq); a chunk with any other
line (one over the size limit) goes line by line, and the line the reader refused carries
its own `reject` meta. Either way every record is what `_raw` makes of its line: bytes,
tenant, source, seq, position (file, offset just after the line), event time."""

from __future__ import annotations

import asyncio
import os

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.records import NO_META, LinesAt, RawRecord
from ingest.sources.inbox import LinePosition
from tests.unit.test_inbox_hostile import Harness, with_harness

LIMIT = 64  # max_line_bytes of the source under test


def where(raw: RawRecord) -> dict[str, object]:
    """What a DLQ entry of the record says of its position."""
    if isinstance(raw.position, LinesAt):
        return raw.position.at(raw.seq)
    assert isinstance(raw.position, LinePosition)
    return msgspec.structs.asdict(raw.position)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(1, 20), st.booleans()), min_size=1, max_size=40),
    st.integers(1, 9),
)
def test_every_raw_is_what_its_line_makes(lines: list[tuple[int, bool]], batch: int) -> None:
    """Lines of random lengths, some over the limit, read in batches of `batch`."""
    datas = [(b"x" * (LIMIT + n) if big else b'{"n":%d}' % n) for n, big in lines]

    async def go(h: Harness) -> None:
        (h.inbox / "acme").mkdir(parents=True)
        path = h.inbox / "acme" / "f.jsonl"
        path.write_bytes(b"".join(d + b"\n" for d in datas))
        mtime = os.stat(path).st_mtime
        await h.run()
        raws = [r for b in h.batches for r in b.records]
        assert len(raws) == len(datas)
        offset = 0
        for i, (raw, data) in enumerate(zip(raws, datas, strict=True), 1):
            offset += len(data) + 1
            assert (raw.tenant, raw.source, raw.seq) == ("acme", h.source.name, i)
            assert where(raw) == {"file": "f.jsonl", "offset": offset}
            assert raw.event_time == mtime and raw.decoded is None
            if len(data) > LIMIT:
                assert raw.meta["reject"]["kind"] == "size"
                assert raw.meta["reject"]["offset"] == offset
            else:
                assert raw.data == data and not raw.meta
        sizes = [len(b.records) for b in h.batches if b.records]  # cut every `batch` lines
        assert all(n == batch for n in sizes[:-1]) and 0 < sizes[-1] <= batch
        for raw in raws:  # a run's: the shared meta; a line's own: its own meta
            assert (raw.meta is NO_META) == isinstance(raw.position, LinesAt)
        if all(len(d) <= LIMIT for d in datas):  # one run a batch (the file is one chunk)
            assert all(isinstance(r.position, LinesAt) for r in raws)
            for batch_ in h.batches:
                assert len({id(r.position) for r in batch_.records}) <= 1

    asyncio.run(with_harness(go, batch=batch, max_line_bytes=LIMIT))


def test_the_shared_meta_cannot_be_written() -> None:
    """A write to a record's shared meta would reach every inbox record: it raises."""
    with pytest.raises(TypeError):
        NO_META["reject"] = {}
    assert not NO_META and "csv_header" not in NO_META
