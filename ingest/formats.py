"""Reading JSON lines and CSV (optionally gzipped) from byte chunks, resumably.

Sources hand over byte chunks (async streams from S3/SFTP, or a local file); `LineReader` turns
them into `Line`s, each carrying the decompressed byte offset just after it, so a checkpoint
can resume mid-file by skipping exactly the lines already committed. Nothing here interprets
the envelope beyond CSV type coercion: the decoder classifies every problem, except the ones
only the reader can see (corrupt gzip, non-UTF-8 CSV, ragged CSV rows), which come back as
`Line.error` so the caller can send the raw bytes to the DLQ and carry on.
"""

from __future__ import annotations

import csv
import math
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from ingest.schema import declared_types

Format = Literal["jsonl", "csv"]

_BOM = b"\xef\xbb\xbf"
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_SALVAGE_STEP = 256  # bytes of compressed input per step when salvaging before a corruption
_EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
}
# CSV columns of the v1 envelope (not in the v3 schema) that still need numbers.
_LEGACY_TYPES = {"rev": "integer", "ts": "number"}
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


@dataclass(slots=True)
class Line:
    """One record's bytes. `offset` is the resume point just after it (decompressed bytes)."""

    offset: int
    data: bytes
    decoded: dict[str, Any] | None = None
    error: str | None = None


class LineReader:
    """Incremental splitter/decoder: `feed` chunks, then `finish` once at end of stream.

    `start_offset` skips every line ending at or before it (a value from `Line.offset`). For
    CSV the header row is read first regardless. `input_offset` says the caller already seeked
    the (uncompressed) stream to that decompressed offset, so skipped bytes need not be fed.
    """

    def __init__(
        self, fmt: Format, gzipped: bool, start_offset: int = 0, *, input_offset: int = 0
    ) -> None:
        if input_offset and (gzipped or fmt == "csv"):
            raise ValueError("input_offset needs an uncompressed JSON-lines stream")
        self._csv = fmt == "csv"
        self._z = zlib.decompressobj(_GZIP_WBITS) if gzipped else None
        self._fed = False
        self._skip = start_offset
        self._pos = input_offset  # decompressed offset of the start of `_tail`
        self._tail = b""
        self._first = input_offset == 0  # the next line may start with a BOM
        self._done = False
        self._header: list[str] | None = None
        self._columns: list[tuple[str | None, str, Callable[[str], Any]]] = []
        self._nested: set[str] = set()  # CSV: nested objects the header has columns for
        self._pending = b""  # CSV: physical lines of a row with a quoted newline, so far

    @property
    def header(self) -> list[str] | None:
        return self._header

    def feed(self, chunk: bytes) -> list[Line]:
        if self._done or not chunk:
            return []
        if self._z is None:
            return self._split(chunk)
        self._fed = True
        data, error = self._inflate(chunk)
        out = self._split(data) if data else []
        if error is not None:
            out.append(self._fail(error))
        return out

    def finish(self) -> list[Line]:
        if self._done:
            return []
        out: list[Line] = []
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
        if self._tail:
            out += self._split(b"\n", final=True)
        if self._pending:
            out.append(
                Line(self._pos, self._pending, None, "CSV row has an unterminated quoted field")
            )
            self._pending = b""
        return out

    # -- decompression --------------------------------------------------------------------

    def _inflate(self, chunk: bytes) -> tuple[bytes, str | None]:
        """Decompress a chunk across concatenated gzip members; keep output before an error."""
        assert self._z is not None
        parts: list[bytes] = []
        while chunk:
            if self._z.eof:
                if not chunk.strip(b"\0"):  # zero padding after the last member
                    break
                self._z = zlib.decompressobj(_GZIP_WBITS)
            saved = self._z.copy()
            try:
                parts.append(self._z.decompress(chunk))
            except zlib.error as exc:
                parts.append(self._salvage(saved, chunk))
                return b"".join(parts), f"corrupt gzip stream: {exc}"
            chunk = self._z.unused_data if self._z.eof else b""
        return b"".join(parts), None

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
        data = self._pending + self._tail
        line = Line(self._pos + len(self._tail), data, None, message)
        self._tail = self._pending = b""
        return line

    # -- splitting ------------------------------------------------------------------------

    def _split(self, data: bytes, final: bool = False) -> list[Line]:
        buf = self._tail + data if self._tail else data
        parts = buf.split(b"\n")
        self._tail = parts.pop()
        out: list[Line] = []
        pos = self._pos
        skip = self._skip
        for part in parts:
            pos += len(part) + (0 if final else 1)
            if self._first:
                self._first = False
                if part.startswith(_BOM):
                    part = part[3:]
            if self._csv:
                line = self._csv_line(part, pos)
                if line is not None and (pos > skip or self._header is None):
                    out.append(line)
                if self._done:
                    break
                continue
            if pos <= skip:
                continue
            if part.endswith(b"\r"):
                part = part[:-1]
            if part and not part.isspace():
                out.append(Line(pos, part))
        self._pos = pos
        return out

    # -- CSV ------------------------------------------------------------------------------

    def _csv_line(self, part: bytes, pos: int) -> Line | None:
        """Join physical lines until quotes balance; the header first, then one Line per row."""
        if self._pending:
            part = self._pending + b"\n" + part
            self._pending = b""
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
    path: Path, start_offset: int = 0, chunk_size: int = 1 << 20
) -> Iterator[list[Line]]:
    """Lines of a local file in batches (one per chunk); seeks when the format allows it."""
    fmt, gzipped = detect_format(path.name)
    seek = start_offset if fmt == "jsonl" and not gzipped else 0
    reader = LineReader(fmt, gzipped, start_offset, input_offset=seek)
    with path.open("rb") as fh:
        fh.seek(seek)
        while chunk := fh.read(chunk_size):
            if lines := reader.feed(chunk):
                yield lines
    if lines := reader.finish():
        yield lines


async def read_lines(
    chunks: AsyncIterator[bytes], fmt: Format, gzipped: bool, start_offset: int = 0
) -> AsyncIterator[list[Line]]:
    """Lines of an async byte stream in batches (one per chunk that completed any line)."""
    reader = LineReader(fmt, gzipped, start_offset)
    async for chunk in chunks:
        if lines := reader.feed(chunk):
            yield lines
    if lines := reader.finish():
        yield lines
