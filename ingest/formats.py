"""Reading JSON lines and CSV (optionally gzipped) from byte chunks, resumably.

Sources hand over byte chunks (async streams from S3/SFTP, or a local file); `LineReader` turns
them into `Line`s, each carrying the decompressed byte offset just after it, so a checkpoint
can resume mid-file by skipping exactly the lines already committed. Nothing here interprets
the envelope beyond CSV type coercion: the decoder classifies every problem, except the ones
only the reader can see (corrupt gzip, non-UTF-8 CSV, ragged CSV rows, lines over the size
limit), which come back as `Line.error` so the caller can send the bytes to the DLQ (through
the `reject` meta, `reject_meta`) and carry on. Memory stays bounded by the line limit plus one
chunk: a longer line is counted and dropped as it streams past, never assembled.
"""

from __future__ import annotations

import csv
import math
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal, cast

import msgspec
import orjson

from ingest.schema import declared_types

Format = Literal["jsonl", "csv"]

_BOM = b"\xef\xbb\xbf"
GZIP_WBITS = 16 + zlib.MAX_WBITS
_SALVAGE_STEP = 256  # bytes of compressed input per step when salvaging before a corruption
DEFAULT_MAX_LINE_BYTES = 1024 * 1024  # = http.max_record_bytes's default
PREVIEW_BYTES = 1024  # of an oversized line: kept as its DLQ payload
INFLATE_STEP = 1 << 20  # decompressed bytes per step (a gzip bomb is read a step at a time)
FEED_FIRST = 256  # compressed bytes first fed per member (see LineReader._inflate)
_DETAIL_PREVIEW = 200  # of an oversized line: shown in its DLQ detail
_EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
}
# CSV columns of the v1 envelope (not in the v3 schema) that still need numbers.
_LEGACY_TYPES = {"rev": "integer", "ts": "number"}
_PLUS_ONE = (1).__add__
_NESTED = ("attributes", "data")  # `attributes.<name>` (v2/v3) and `data.<name>` (v1) columns


def detect_format(name: str) -> tuple[Format, bool]:
    """Format and gzip flag from a file or object name, e.g. `x.jsonl.gz` -> ("jsonl", True)."""
    lower = name.lower()
    gzipped = lower.endswith(".gz")
    if gzipped:
        lower = lower[:-3]
    for ext, fmt in _EXTENSIONS.items():
        if lower.endswith(ext):
            return fmt, gzipped
    raise ValueError(
        f"unsupported file type: {name!r} (expected .jsonl, .ndjson, .json or .csv, optionally .gz)"
    )


class Line(msgspec.Struct, gc=False):
    """One record's bytes. `offset` is the resume point just after it (decompressed bytes).

    `error` says why the reader could not read it (the record goes to the DLQ as it is);
    `detail` adds fields for that DLQ entry (an oversized line's `size`, `limit`, `first_bytes`).

    A msgspec Struct, like `RawRecord`: one is built per line read, in C (a quarter of a
    dataclass's cost), and the garbage collector does not track it (it is never in a cycle).
    """

    offset: int
    data: bytes
    decoded: dict[str, Any] | None = None
    error: str | None = None
    detail: dict[str, Any] | None = None


class LineRun(msgspec.Struct, gc=False):
    """Whole JSON lines in a row, read together: `parts[i]`'s resume point is `ends[i]`.

    What a reader made with `runs=True` hands out for a chunk of plain JSON lines (none to
    skip, over the limit, blank or with a CR) instead of a `Line` each: the split's lists as
    they are, one object a chunk, where a Line a line cost its building on the reading thread
    and its freeing on the event loop (the inbox's, `ingest.sources.inbox`)."""

    ends: list[int]
    parts: list[bytes]


def reject_meta(line: Line, kind: str, **where: Any) -> dict[str, Any]:
    """The `reject` meta of a RawRecord made of a Line the reader could not read (see
    ingest.sources.base.SourceBatch): the decoder DLQs it as VALIDATION_FAIL with these fields."""
    return {
        "kind": kind,
        "message": line.error,
        **where,
        "offset": line.offset,
        **(line.detail or {}),
    }


@dataclass(slots=True)
class _Oversize:
    """A line (CSV: a row) past the limit, being skipped: only its size and head are kept."""

    start: int  # offset of its first byte
    size: int  # bytes so far (newlines inside a CSV row included)
    head: bytes  # its first PREVIEW_BYTES
    quotes: int  # CSV: parity of the quotes so far; the row ends at a newline when even

    def take(self, data: bytes) -> None:
        self.size += len(data)
        if len(self.head) < PREVIEW_BYTES:
            self.head += data[: PREVIEW_BYTES - len(self.head)]


def only_nul_padding(data: bytes, pos: int) -> bool:
    """Whether `data[pos:]` is empty or all NUL bytes: the padding gzip(1) allows after the
    last member of a gzip stream (files and webhook bodies alike)."""
    end = len(data)
    return pos == end or (data[pos] == 0 and data.count(0, pos) == end - pos)


class LineReader:
    """Incremental splitter/decoder: `feed` chunks, then `finish` once at end of stream.

    `start_offset` skips every line ending at or before it (a value from `Line.offset`). For
    CSV the header row is read first regardless. `input_offset` says the caller already seeked
    the (uncompressed) stream to that decompressed offset, so skipped bytes need not be fed.

    Memory is bounded by `max_line_bytes` plus one chunk, whatever the input: a line (CSV: a
    row) longer than `max_line_bytes` is never assembled; its bytes are counted and dropped as
    they arrive, and once it ends it comes back as one error Line carrying its size and its
    first PREVIEW_BYTES, so the caller can DLQ it and read on.
    """

    def __init__(
        self,
        fmt: Format,
        gzipped: bool,
        start_offset: int = 0,
        *,
        input_offset: int = 0,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        runs: bool = False,
    ) -> None:
        if input_offset and (gzipped or fmt == "csv"):
            raise ValueError("input_offset needs an uncompressed JSON-lines stream")
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be at least 1")
        self._csv = fmt == "csv"
        self._runs = runs  # plain lines as LineRuns (`run_pieces`, `run_finish`)
        self._z = zlib.decompressobj(GZIP_WBITS) if gzipped else None
        self._fed = False
        self._skip = start_offset
        self._max = max_line_bytes
        self._pos = input_offset  # decompressed offset just after the last complete line
        self._tail: list[bytes] = []  # the incomplete line after `_pos`, in pieces
        self._tail_len = 0
        self._over: _Oversize | None = None  # the line being skipped, if any
        self._first = input_offset == 0  # the next line may start with a BOM
        self._done = False
        self._header: list[str] | None = None
        self._columns: list[tuple[str | None, str, Callable[[str], Any]]] = []
        self._nested: set[str] = set()  # CSV: nested objects the header has columns for
        self._pending = b""  # CSV: physical lines of a row with a quoted newline, so far

    @property
    def header(self) -> list[str] | None:
        return self._header

    @property
    def buffered(self) -> int:
        """Bytes held for incomplete lines (never more than max_line_bytes + one chunk)."""
        held = len(self._over.head) if self._over is not None else self._tail_len
        return held + len(self._pending)

    def feed(self, chunk: bytes) -> list[Line]:
        return [line for lines in self.pieces(chunk) for line in lines]

    def pieces(self, chunk: bytes) -> Iterator[list[Line]]:
        """The lines a chunk completes, in lists of at most one decompression step's worth:
        a small gzip chunk that inflates to gigabytes is never held whole."""
        if self._runs:
            raise TypeError("a reader of runs hands out run_pieces")
        return cast("Iterator[list[Line]]", self._pieces(chunk))  # no LineRun without `runs`

    def run_pieces(self, chunk: bytes) -> Iterator[list[Line | LineRun]]:
        """`pieces`, with each chunk's plain JSON lines as LineRuns (a reader with `runs`)."""
        return self._pieces(chunk)

    def finish(self) -> list[Line]:
        if self._runs:
            raise TypeError("a reader of runs hands out run_finish")
        return cast("list[Line]", self._finish())  # no LineRun without `runs`

    def run_finish(self) -> list[Line | LineRun]:
        return self._finish()

    def _pieces(self, chunk: bytes) -> Iterator[list[Line | LineRun]]:
        if self._done or not chunk:
            return
        if self._z is None:
            yield self._split(chunk)
            return
        self._fed = True
        for data, error in self._inflate(chunk):
            out = self._split(data) if data else []
            if error is not None:
                out.append(self._fail(error))
            yield out

    def _finish(self) -> list[Line | LineRun]:
        if self._done:
            return []
        out: list[Line | LineRun] = []
        if self._z is not None and self._fed:
            try:
                rest = self._z.flush()
            except zlib.error as exc:  # pragma: no cover - flush after decompress rarely fails
                return [self._fail(f"corrupt gzip stream: {exc}")]
            if rest:
                out += self._split(rest)
            if not self._z.eof:
                out.append(self._fail("truncated gzip stream (ended before its trailer)"))
                return out
        self._done = True
        end = self._pos + self._tail_len
        if self._over is None and self._tail:
            part = b"".join(self._tail)
            self._tail, self._tail_len = [], 0
            self._line(part, end, out)
        if self._over is not None:  # ends with the stream (a CSV row: unterminated too)
            if end > self._skip or (self._csv and self._header is None):
                out.append(self._too_long(self._over, end))
            self._over = None
        if self._pending:
            out.append(
                Line(self._pos, self._pending, None, "CSV row has an unterminated quoted field")
            )
            self._pending = b""
        self._pos = end
        return out

    # -- decompression --------------------------------------------------------------------

    def _inflate(self, chunk: bytes) -> Iterator[tuple[bytes, str | None]]:
        """Decompress a chunk across concatenated gzip members, at most INFLATE_STEP bytes
        at a time; on an error, the output just before it comes with the message.

        The chunk is fed in slices growing from FEED_FIRST bytes, and what was consumed is
        counted, never copied: zlib copies everything past a member's end (`unused_data`), so
        feeding the whole chunk cost the rest of the chunk once per member (1 MiB of tiny
        members: 1.5 s, quadratic in the chunk; a hostile file read ~1.5 s per MiB)."""
        assert self._z is not None
        view = memoryview(chunk)
        pos, end, size = 0, len(chunk), FEED_FIRST
        while True:
            z = self._z
            if z.eof:
                if only_nul_padding(chunk, pos):
                    return  # zero padding after the last member
                z = self._z = zlib.decompressobj(GZIP_WBITS)
                size = FEED_FIRST
            piece = view[pos : pos + size]
            size = min(size * 2, INFLATE_STEP)
            saved = z.copy()
            try:
                data = z.decompress(piece, INFLATE_STEP)
            except zlib.error as exc:
                yield self._salvage(saved, bytes(piece)), f"corrupt gzip stream: {exc}"
                return
            pos += len(piece) - len(z.unused_data if z.eof else z.unconsumed_tail)
            if data:
                yield data, None
            if pos == end and (z.eof or len(data) < INFLATE_STEP):
                return

    @staticmethod
    def _salvage(z: Any, chunk: bytes) -> bytes:
        """Re-decompress in small steps to recover the output just before the corruption."""
        parts: list[bytes] = []
        for i in range(0, len(chunk), _SALVAGE_STEP):
            try:
                parts.append(z.decompress(chunk[i : i + _SALVAGE_STEP]))
            except zlib.error:
                break
        return b"".join(parts)

    def _fail(self, message: str) -> Line:
        """The one error Line for an unreadable stream: carries the partial line; reading stops."""
        self._done = True
        data = self._over.head if self._over is not None else self._pending + b"".join(self._tail)
        line = Line(self._pos + self._tail_len, data, None, message)
        self._tail, self._tail_len, self._pending, self._over = [], 0, b"", None
        return line

    # -- splitting ------------------------------------------------------------------------

    def _split(self, data: bytes) -> list[Line | LineRun]:
        parts = data.split(b"\n")
        rest = parts.pop()  # the start of the next, still incomplete, line
        out: list[Line | LineRun] = []
        if parts:
            pos = self._pos
            if self._over is not None:
                pos += self._tail_len  # bytes of it already counted and dropped
                self._tail_len = 0
            elif self._tail:
                parts[0] = b"".join(self._tail) + parts[0]  # at most max_line_bytes + a chunk
                self._tail, self._tail_len = [], 0
            if (
                not self._csv
                and self._over is None
                and pos >= self._skip
                and max(map(len, parts)) <= self._max
                and b"\r" not in data
                and not parts[0].endswith(b"\r")  # the held start of a line joined to it
            ):
                # JSON lines, none to skip, none too long, no CR: what `_line` does to each,
                # as one comprehension (the end offsets summed in C), not a call per line;
                # `strip()` is empty exactly for the lines `_line` leaves out (ASCII space).
                if self._first:  # the stream's first line may start with a BOM
                    self._first = parts[0].startswith(_BOM)
                    if self._first:
                        pos += len(parts[0]) + 1
                        self._line(parts[0], pos, out)
                        del parts[0]
                if self._runs:
                    self._pos = self._run(parts, pos, out)
                    if rest:
                        self._hold(rest)
                    return out
                ends = accumulate(map(_PLUS_ONE, map(len, parts)), initial=pos)
                next(ends)
                lines = zip(ends, parts, strict=True)
                out += [Line(end, part) for end, part in lines if part.strip()]
                self._pos = pos + sum(map(len, parts)) + len(parts)
                if rest:
                    self._hold(rest)
                return out
            line, skip_over = self._line, self._skip_over
            for part in parts:
                pos += len(part) + 1
                if self._over is None:
                    line(part, pos, out)
                else:
                    skip_over(part, pos, out)
                if self._done:
                    break
            self._pos = pos
        if rest and not self._done:
            self._hold(rest)
        return out

    @staticmethod
    def _run(parts: list[bytes], pos: int, out: list[Line | LineRun]) -> int:
        """Plain JSON lines starting at `pos` as one LineRun, blank ones left out as `_line`
        leaves them (`bytes.isspace` is `not strip()` but for b""); returns the offset after."""
        ends = list(accumulate(map(_PLUS_ONE, map(len, parts)), initial=pos))
        del ends[0]
        after = ends[-1] if ends else pos
        if not all(parts) or any(map(bytes.isspace, parts)):
            kept = [i for i, part in enumerate(parts) if part.strip()]
            parts, ends = [parts[i] for i in kept], [ends[i] for i in kept]
        if parts:
            out.append(LineRun(ends, parts))
        return after

    def _hold(self, rest: bytes) -> None:
        """Keep the incomplete end of a chunk, or only count it once past the limit."""
        over = self._over
        if over is not None:
            over.take(rest)
            if self._csv:
                over.quotes += rest.count(b'"')
            self._tail_len += len(rest)
            return
        self._tail.append(rest)
        self._tail_len += len(rest)
        if self._tail_len + len(self._pending) > self._max:
            head = b"".join(self._tail)[:PREVIEW_BYTES]
            # A CSV row's earlier physical lines, each with the newline after it.
            pending = self._pending + b"\n" if self._pending else b""
            self._over = _Oversize(
                self._pos - len(pending),
                len(pending) + self._tail_len,
                (pending[:PREVIEW_BYTES] + head)[:PREVIEW_BYTES],
                self._quotes(pending) + self._quotes(b"".join(self._tail)),
            )
            self._tail, self._pending, self._first = [], b"", False

    def _quotes(self, data: bytes) -> int:
        return data.count(b'"') if self._csv else 0

    def _skip_over(self, part: bytes, pos: int, out: list[Line | LineRun]) -> None:
        """The next physical line of the oversized line being skipped: does it end it?"""
        over = self._over
        assert over is not None
        over.take(part)
        if self._csv:
            over.quotes += part.count(b'"')
            if over.quotes % 2:
                over.take(b"\n")  # a quoted field goes on past this newline
                return
        self._over = None
        if pos > self._skip or (self._csv and self._header is None):
            out.append(self._too_long(over, pos))

    def _too_long(self, over: _Oversize, pos: int) -> Line:
        what = "line"
        if self._csv:
            what = "CSV row" if self._header is not None else "CSV header"
            if self._header is None:
                self._done = True  # no header, no rows
        first = over.head[:_DETAIL_PREVIEW].decode("utf-8", "backslashreplace")
        message = (
            f"{what} is {over.size} bytes, over the {self._max}-byte limit (max_record_bytes); "
            f"cut off unread after its first {len(over.head)} bytes"
        )
        detail = {
            "kind": "size",
            "path": "$",
            "expected": f"<= {self._max} bytes",
            "found": over.size,
            "size": over.size,
            "limit": self._max,
            "first_bytes": first,
            "start_offset": over.start,
        }
        return Line(pos, over.head, None, message, detail)

    def _line(self, part: bytes, pos: int, out: list[Line | LineRun]) -> None:
        """One complete physical line ending at `pos`."""
        if self._first:
            self._first = False
            if part.startswith(_BOM):
                part = part[3:]
        if self._csv:
            line = self._csv_line(part, pos)
            if line is not None and (pos > self._skip or self._header is None):
                out.append(line)
            return
        if pos <= self._skip:
            return
        if len(part) > self._max:
            over = _Oversize(pos - len(part) - 1, len(part), part[:PREVIEW_BYTES], 0)
            out.append(self._too_long(over, pos))
            return
        if part.endswith(b"\r"):
            part = part[:-1]
        if part and not part.isspace():
            out.append(Line(pos, part))

    # -- CSV ------------------------------------------------------------------------------

    def _csv_line(self, part: bytes, pos: int) -> Line | None:
        """Join physical lines until quotes balance; the header first, then one Line per row."""
        if self._pending:
            part = self._pending + b"\n" + part
            self._pending = b""
        if len(part) > self._max:
            quotes = part.count(b'"')
            over = _Oversize(pos - len(part) - 1, len(part), part[:PREVIEW_BYTES], quotes)
            if quotes % 2:
                over.take(b"\n")  # the row goes on past this newline: skip the rest of it
                self._over = over
                return None
            return self._too_long(over, pos)
        if part.count(b'"') % 2:
            self._pending = part
            return None
        if part.endswith(b"\r"):
            part = part[:-1]
        if not part or part.isspace():
            return None
        try:
            text = part.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self._header is None:
                self._done = True
            return Line(pos, part, None, f"not UTF-8 at byte {exc.start}")
        try:
            row = next(csv.reader((text,)))
        except csv.Error as exc:
            return Line(pos, part, None, f"unreadable CSV row: {exc}")
        if self._header is None:
            self._set_header(row)
            return None
        if len(row) != len(self._columns):
            return Line(
                pos, part, None, f"CSV row has {len(row)} columns, header has {len(self._columns)}"
            )
        return Line(pos, part, self._envelope(row), None)

    def _set_header(self, names: list[str]) -> None:
        self._header = names
        top, attrs = declared_types()
        top = {**top, **_LEGACY_TYPES}
        for name in names:
            parent, _, child = name.partition(".")
            if child and parent in _NESTED:
                self._columns.append((parent, child, _COERCE.get(attrs.get(child, ""), _keep)))
            else:
                self._columns.append((None, name, _COERCE.get(top.get(name, ""), _keep)))
        self._nested = {parent for parent, _, _ in self._columns if parent is not None}

    def _envelope(self, row: list[str]) -> dict[str, Any]:
        """A row as an envelope dict; an empty cell is an absent field."""
        body: dict[str, Any] = {parent: {} for parent in self._nested}
        for (parent, name, conv), cell in zip(self._columns, row, strict=True):
            if cell == "":
                continue
            if parent is None:
                body[name] = conv(cell)
            else:
                body[parent][name] = conv(cell)
        return body


def _keep(cell: str) -> Any:
    return cell


def _to_int(cell: str) -> Any:
    try:
        return int(cell)
    except ValueError:
        return cell  # left as a string: the validator reports the retyped field


def _to_number(cell: str) -> Any:
    try:
        return int(cell)
    except ValueError:
        pass
    try:
        value = float(cell)
    except ValueError:
        return cell
    return value if math.isfinite(value) else cell


_TRUE = {"true", "1", "yes", "t", "y"}
_FALSE = {"false", "0", "no", "f", "n"}


def _to_bool(cell: str) -> Any:
    low = cell.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    return cell


def _to_json(cell: str) -> Any:
    try:
        return orjson.loads(cell)
    except orjson.JSONDecodeError:
        return cell


_COERCE: dict[str, Callable[[str], Any]] = {
    "integer": _to_int,
    "number": _to_number,
    "boolean": _to_bool,
    "array": _to_json,
    "object": _to_json,
}


def read_file_lines(
    path: Path,
    start_offset: int = 0,
    chunk_size: int = 1 << 20,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[list[Line]]:
    """Lines of a local file in batches (one per chunk); seeks when the format allows it."""
    fmt, gzipped = detect_format(path.name)
    seek = start_offset if fmt == "jsonl" and not gzipped else 0
    reader = LineReader(
        fmt, gzipped, start_offset, input_offset=seek, max_line_bytes=max_line_bytes
    )
    with path.open("rb") as fh:
        fh.seek(seek)
        while chunk := fh.read(chunk_size):
            for lines in reader.pieces(chunk):
                if lines:
                    yield lines
    if lines := reader.finish():
        yield lines


async def read_lines(
    chunks: AsyncIterator[bytes],
    fmt: Format,
    gzipped: bool,
    start_offset: int = 0,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    *,
    input_offset: int = 0,
) -> AsyncIterator[list[Line]]:
    """Lines of an async byte stream in batches (one per chunk that completed any line);
    `input_offset`: where in the item the stream starts (a ranged read, see LineReader)."""
    reader = LineReader(
        fmt, gzipped, start_offset, input_offset=input_offset, max_line_bytes=max_line_bytes
    )
    async for chunk in chunks:
        for lines in reader.pieces(chunk):
            if lines:
                yield lines
    if lines := reader.finish():
        yield lines
