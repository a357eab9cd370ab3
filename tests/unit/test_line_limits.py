"""Lines over `max_line_bytes`: cut off without being buffered, reported with size and head.

The reader is shared by the inbox, S3 and SFTP, so every property here holds for all three:
whatever the chunking, a line over the limit comes back as exactly one error Line (its size,
its first PREVIEW_BYTES, the right resume offset), the lines around it are untouched, and the
bytes held for incomplete lines never exceed the limit plus one chunk.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.formats import PREVIEW_BYTES, Line, LineReader, read_file_lines

_BYTES = st.binary(max_size=400).map(lambda b: b.replace(b"\n", b"x").replace(b"\xef", b"y"))


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _feed(reader: LineReader, chunks: list[bytes], bounded: bool = True) -> list[Line]:
    """All lines; `bounded`: after each plain chunk, at most limit (or the kept head) + one
    chunk is held."""
    out: list[Line] = []
    biggest = max(map(len, chunks), default=0)
    for chunk in chunks:
        out += reader.feed(chunk)
        if bounded:
            assert reader.buffered <= max(reader._max, PREVIEW_BYTES) + biggest  # never the line
    return out + reader.finish()


def _expected_jsonl(lines: list[bytes], limit: int, final_newline: bool) -> list[Any]:
    out: list[Any] = []
    pos = 0
    for i, raw in enumerate(lines):
        last = i == len(lines) - 1 and not final_newline
        pos += len(raw) + (0 if last else 1)
        if len(raw) > limit:
            out.append(("too_long", pos, len(raw), raw[:PREVIEW_BYTES]))
            continue
        text = raw[:-1] if raw.endswith(b"\r") else raw
        if text and not text.isspace():
            out.append(("line", pos, text))
    return out


def _got(lines: list[Line]) -> list[Any]:
    out: list[Any] = []
    for line in lines:
        if line.error is None:
            out.append(("line", line.offset, line.data))
        else:
            assert line.detail is not None, line.error
            assert line.detail["kind"] == "size" and line.detail["size"] == line.detail["found"]
            out.append(("too_long", line.offset, line.detail["size"], line.data))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(_BYTES, max_size=12),
    limit=st.integers(1, 300),
    final_newline=st.booleans(),
    gz=st.booleans(),
    cuts=st.lists(st.integers(0, 10**5), max_size=12),
    data=st.data(),
)
def test_jsonl_lines_over_the_limit_any_chunking(
    lines: list[bytes],
    limit: int,
    final_newline: bool,
    gz: bool,
    cuts: list[int],
    data: st.DataObject,
) -> None:
    plain = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    blob = gzip.compress(plain) if gz else plain
    reader = LineReader("jsonl", gz, max_line_bytes=limit)
    got = _got(_feed(reader, _chunks(blob, cuts), bounded=not gz))
    want = _expected_jsonl(lines, limit, final_newline)
    assert got == want
    # resuming after any of them skips exactly what came before, oversized lines included
    if want:
        k = data.draw(st.integers(0, len(want) - 1))
        reader = LineReader("jsonl", gz, want[k][1], max_line_bytes=limit)
        assert _got(_feed(reader, _chunks(blob, cuts), bounded=not gz)) == want[k + 1 :]


def _csv_bytes(rows: list[list[str]]) -> list[bytes]:
    out = []
    for row in rows:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL).writerow(row)
        out.append(buf.getvalue().encode()[:-1])
    return out


_CELL = st.text(st.sampled_from('ab,"\n\r é'), max_size=150)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cells=st.lists(st.tuples(_CELL, _CELL), max_size=10),
    extra=st.integers(0, 200),
    cuts=st.lists(st.integers(0, 10**5), max_size=12),
)
def test_csv_rows_over_the_limit_any_chunking(
    cells: list[tuple[str, str]], extra: int, cuts: list[int]
) -> None:
    """Quoted newlines make a row span physical lines: the limit is on the whole row."""
    header = "tenant_id,attributes.note"
    rows = [[f"t{a!r}"[:40].replace("\n", " ") or "t", b] for a, b in cells]
    encoded = _csv_bytes(rows)
    limit = len(header) + extra
    blob = header.encode() + b"\n" + b"\n".join(encoded) + (b"\n" if encoded else b"")
    got = _feed(LineReader("csv", False, max_line_bytes=limit), _chunks(blob, cuts))
    assert len(got) == len(rows)
    pos = len(header) + 1
    for row, raw, line in zip(rows, encoded, got, strict=True):
        pos += len(raw) + 1
        assert line.offset == pos
        if len(raw) > limit:
            assert line.detail is not None and line.detail["size"] == len(raw), line
            assert line.data == raw[:PREVIEW_BYTES]
            continue
        assert line.error is None, line.error
        assert line.decoded is not None
        assert line.decoded["tenant_id"] == row[0]
        assert line.decoded.get("attributes", {}).get("note", "") == row[1]


def test_csv_header_over_the_limit_stops_the_file() -> None:
    reader = LineReader("csv", False, max_line_bytes=10)
    lines = reader.feed(b"tenant_id,attributes.note\nacme,x\n") + reader.finish()
    assert len(lines) == 1
    assert lines[0].error is not None and lines[0].error.startswith("CSV header is 25 bytes")


def test_unterminated_quoted_row_over_the_limit_ends_with_the_stream() -> None:
    reader = LineReader("csv", False, max_line_bytes=50)
    lines = _feed(reader, [b"tenant_id,attributes.note\n", b'acme,"' + b"x\n" * 100])
    assert len(lines) == 1
    assert lines[0].detail is not None and lines[0].detail["size"] == 206


def test_detail_names_size_limit_and_first_bytes() -> None:
    reader = LineReader("jsonl", False, max_line_bytes=100)
    long = b'{"tenant_id":"acme","x":"' + b"\xff" * 2000 + b'"}'
    lines = _feed(reader, [b'{"a":1}\n', long, b'\n{"a":2}\n'])
    assert [line.data for line in lines if line.error is None] == [b'{"a":1}', b'{"a":2}']
    (big,) = [line for line in lines if line.error is not None]
    assert big.offset == 8 + len(long) + 1
    assert big.data == long[:PREVIEW_BYTES]
    assert big.detail is not None
    assert big.detail["size"] == len(long) and big.detail["limit"] == 100
    assert big.detail["first_bytes"].startswith('{"tenant_id":"acme","x":"\\xff\\xff')
    assert big.detail["start_offset"] == 8
    assert big.error == (
        f"line is {len(long)} bytes, over the 100-byte limit (max_record_bytes); "
        f"cut off unread after its first {PREVIEW_BYTES} bytes"
    )


@pytest.mark.parametrize("gz", [False, True])
def test_memory_is_bounded_by_the_chunk_not_the_line(tmp_path: Any, gz: bool) -> None:
    """A 64 MB line with no newline: peak allocation stays near limit + chunk."""
    path = tmp_path / ("huge.jsonl" + (".gz" if gz else ""))
    body = b'{"x":"' + b"a" * (64 << 20) + b'"}\n{"a":1}\n'
    path.write_bytes(gzip.compress(body, 1) if gz else body)
    del body
    tracemalloc.start()
    try:
        got = [
            line
            for batch in read_file_lines(path, chunk_size=256 << 10, max_line_bytes=1 << 20)
            for line in batch
        ]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [line.data for line in got if line.error is None] == [b'{"a":1}']
    assert got[0].detail is not None and got[0].detail["size"] == (64 << 20) + 8
    assert peak < 6 << 20, f"peak {peak >> 20} MiB while reading a 64 MiB line"
