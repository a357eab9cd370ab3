"""The webhook door: `POST /v1/webhooks/{tenant}/{source}`, up to the durable intake.

Checked in this order, each as cheaply as it can be: names; the credential in the headers
(401/403, `ingest.api.auth.Gate`); drain/pause (503); a Content-Encoding other than
gzip/deflate (415); the intake's bound (closed-loop admission, 429) and disk space (507) from
the headers, before the body is read; size (413); the body read under a total deadline and a
minimum rate (408); the signature over the body as sent (401); gzip/deflate undone, inflating
at most `http.max_body_bytes` (413; 400 when the bytes are not what the header says); the
body split into records (400 when nothing in it is JSON); more records than the tenant's burst
or the intake ever holds (413: split it); the intake's bound and the tenant's tokens (429);
then the append, and 202 only once the body is durable. The tenant's tokens are taken
here, once: the records read back from the intake are not charged again (see
`ingest.webhook`).
"""

from __future__ import annotations

import logging
import math
import re
import time
import zlib
from typing import Any, Protocol

import msgspec
import orjson
from starlette.requests import Request
from starlette.responses import Response

from ingest.api.auth import Gate, peer
from ingest.api.body import BodyTooLarge, BodyTooSlow, read_body
from ingest.api.responses import error, json_response
from ingest.auth.guard import WebhookCheck
from ingest.config import Config
from ingest.errors import DiskFull, StoreUnavailable, is_disk_full
from ingest.formats import FEED_FIRST, GZIP_WBITS, INFLATE_STEP, only_nul_padding
from ingest.names import NAME_RULE as _NAME
from ingest.pipeline.admission import Admission, BackpressureState, Rejected
from ingest.webhook import Intake
from ingest.webhook.spread import NOT_JSON, entity_keys

log = logging.getLogger(__name__)
_NDJSON_TYPES = (
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/json-seq",
    "text/plain",
)
# The elements of a JSON array body, as the exact bytes sent (never re-serialized: an integer
# beyond 64 bits must reach the decoder as its digits, not as orjson's float).
_RAW_ARRAY = msgspec.json.Decoder(list[msgspec.Raw])
# A JSON string or one structural character: what `_array_elements` walks (strings skipped
# whole, so a bracket or comma inside one is not structure)
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[][{},]')


class WebhookHost(Protocol):
    """What the door needs from the running service."""

    @property
    def config(self) -> Config: ...

    @property
    def admission(self) -> Admission: ...

    @property
    def intake(self) -> Intake | None:
        """Where webhook bodies are made durable; None when no webhook source is configured."""
        ...

    def refuse_intake(self, incoming_bytes: int) -> str | None:
        """Why a webhook body of this size is refused for lack of disk space, or None."""
        ...

    def notify_webhook(self) -> None:
        """A body was appended to the intake: wake its reader."""
        ...


async def receive(service: WebhookHost, gate: Gate, request: Request) -> Response:
    """The door for one request (the order of checks: the module's docstring)."""
    tenant = request.path_params["tenant"]
    source = request.path_params["source"]
    for what, value in (("tenant", tenant), ("source", source)):
        if not _NAME.match(value):
            return error(400, f"invalid_{what}", f"{what} '{value}' must match {_NAME.pattern}")
    intake = service.intake
    if intake is None:
        return error(404, "webhooks_disabled", "no webhook source is configured")
    check = gate.webhook_headers(tenant, request)  # a credential the headers refuse: 401/403
    if isinstance(check, Response):
        return check
    state = service.admission.state
    if state in (BackpressureState.DRAIN, BackpressureState.PAUSED):
        return error(
            503,
            state.value,
            (
                "ingest is draining (an operator's drain, or this instance shutting down); "
                "nothing new is accepted here: retry later or against another instance"
                if state is BackpressureState.DRAIN
                else "ingest is paused; nothing new is accepted until an operator resumes it"
            ),
            headers={"Retry-After": "30"},
        )

    codings = _codings(request.headers.get("content-encoding", ""))
    if isinstance(codings, Response):  # 415 before the body is read
        return codings
    declared_size = request.headers.get("content-length", "")
    declared_bytes = int(declared_size) if declared_size.isdigit() else 0
    host = request.client.host if request.client else ""
    try:  # a full intake refuses before the body is read: refusing must stay cheap
        let = service.admission.check_open(
            tenant, declared_bytes, host, authenticated=check.identity is not None
        )
    except Rejected as rej:
        return _refused(rej)
    try:
        return await _read_and_take(service, gate, request, check, tenant, source, codings, host)
    finally:
        if let is not None:  # one body read at a time at the bound: the next one's turn
            service.admission.body_read(let)


async def _read_and_take(
    service: WebhookHost,
    gate: Gate,
    request: Request,
    check: WebhookCheck,
    tenant: str,
    source: str,
    codings: list[str],
    host: str,
) -> Response:
    """The rest of `receive` once the headers and the intake's bound passed."""
    declared = request.headers.get("content-length")
    refused = service.refuse_intake(int(declared) if declared and declared.isdigit() else 0)
    if refused is not None:  # below the disk's low watermark: the rest is the pipeline's
        return _insufficient_storage(refused)

    limit = service.config.http.max_body_bytes
    if declared is not None and declared.isdigit() and int(declared) > limit:
        too_large = f"body is {declared} bytes; the limit is {limit}"
        return error(413, "body_too_large", too_large)
    http = service.config.http
    try:
        body = await read_body(
            request,
            limit=limit,
            timeout=http.body_timeout_seconds,
            min_rate=http.min_body_bytes_per_second,
            grace=http.body_grace_seconds,
        )
    except BodyTooLarge as exc:
        return error(413, "body_too_large", str(exc))
    except BodyTooSlow as exc:
        log.info("webhook %s/%s from %s: %s", tenant, source, peer(request) or "?", exc)
        return error(408, "request_timeout", str(exc), headers={"Connection": "close"})
    who = await gate.webhook_body(check, body)  # the signature, before anything is stored
    if isinstance(who, Response):
        if who.status_code == 401:  # its host acts on the line for it only once authenticated
            service.admission.auth_failed(tenant, host)
        return who
    decoded = _decode(body, codings, limit)  # the signature was over the bytes sent
    if isinstance(decoded, Response):
        response = decoded
    else:
        content_type = request.headers.get("content-type", "")
        response = await _take(service, tenant, source, decoded, content_type, host)
    if response.status_code != 202:
        await gate.release(check)  # not accepted: the sender may send the same request again
    return response


async def _take(
    service: WebhookHost, tenant: str, source: str, body: bytes, content_type: str, host: str
) -> Response:
    """Split an authenticated body into records, admit them and make them durable (202)."""
    intake = service.intake
    assert intake is not None
    if not body.strip():
        return error(
            400, "empty_body", "the body is empty; send a JSON object, an array, or NDJSON"
        )

    lines, malformed, values = split_values(body, content_type)
    if isinstance(lines, Response):
        return lines
    keys = None  # None: the tenant's partition (the repair functions may change entities)
    if intake.spread and not service.config.transformers:
        keys = entity_keys(tenant, values, lines)
    refused = service.refuse_intake(len(body))
    if refused is not None:
        return _insufficient_storage(refused)

    admission = service.admission
    try:
        await admission.try_admit(tenant, len(lines), len(body), host)
    except Rejected as rej:
        return _refused(rej)

    try:
        intake_id = await intake.append(tenant, source, lines, time.time(), keys)
    except StoreUnavailable as exc:
        admission.appended(len(lines), len(body), ok=False)
        if isinstance(exc, DiskFull) or is_disk_full(exc):
            return _insufficient_storage(f"the data disk is full ({exc.cause})")
        return error(
            503,
            "intake_unavailable",
            f"could not make the body durable ({exc}); nothing was accepted, retry later",
            headers={"Retry-After": "5"},
        )
    except BaseException:
        admission.appended(len(lines), len(body), ok=False)
        raise
    admission.appended(len(lines), len(body), ok=True)
    service.notify_webhook()
    return json_response(
        {
            "status": "accepted",
            "records": len(lines),
            "malformed": malformed,
            "intake_id": intake_id,
            **(
                {
                    "note": "malformed lines are accepted into the DLQ as "
                    "VALIDATION_FAIL; see dlqtriage"
                }
                if malformed
                else {}
            ),
        },
        202,
    )


def _refused(rej: Rejected) -> Response:
    """413 for a request that can never be admitted as it is (split it; no Retry-After: a
    retry gets the same); 429 with Retry-After while throttled (tenant rate, full intake);
    503 drain/pause."""
    if rej.too_large:
        return error(413, "too_many_records", rej.reason)
    if rej.state is BackpressureState.THROTTLED:
        retry_after = max(1, math.ceil(rej.retry_after or 1))
        return error(
            429,
            "throttled",
            rej.reason,
            retry_after_seconds=retry_after,
            headers={"Retry-After": str(retry_after)},
        )
    return error(503, rej.state.value, rej.reason, headers={"Retry-After": "30"})


def _insufficient_storage(why: str) -> Response:
    return error(
        507,
        "insufficient_storage",
        f"{why}; nothing was accepted, retry later",
        headers={"Retry-After": "30"},
    )


_CODINGS = ("gzip", "x-gzip", "deflate", "identity")


def _codings(header: str) -> list[str] | Response:
    """The body's content codings, in the order they were applied; 415 for one we cannot
    undo (refused before the body is read)."""
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    unknown = [c for c in codings if c not in _CODINGS]
    if unknown:
        return error(
            415,
            "unsupported_encoding",
            f"Content-Encoding {header.strip()!r} is not supported; send the body as is, or "
            "with Content-Encoding gzip or deflate (signed over the bytes sent)",
        )
    return [c for c in codings if c != "identity"]


def _decode(body: bytes, codings: list[str], limit: int) -> bytes | Response:
    """Undo the codings (last applied first), inflating at most `limit` bytes (413 past it: a
    small compressed body must not become gigabytes); 400 when the bytes are not what the
    header says."""
    for coding in reversed(codings):
        out = _inflate(body, coding, limit)
        if isinstance(out, Response):
            return out
        body = out
    return body


def _inflate(body: bytes, coding: str, limit: int) -> bytes | Response:
    """One coding undone, all of it: a gzip body may be several members one after the other
    (RFC 1952; `cat a.gz b.gz`; NUL padding at the end allowed), each inflated in turn; any
    other bytes after the compressed data are 400, never dropped (a second member was dropped
    with a 202: its records lost). deflate is zlib (any window size) or raw.

    The input is fed in growing slices (FEED_FIRST bytes doubling to INFLATE_STEP per member,
    as `ingest.formats` reads gzip files) so that what zlib copies past a member's end
    (`unused_data`) stays about the member's size: a body of many tiny members costs linear
    time, not the body's size once per member."""
    out = bytearray()
    view = memoryview(body)
    pos, end = 0, len(body)
    while True:
        if coding != "deflate":
            wbits = GZIP_WBITS
        elif _zlib_header(body[pos : pos + 2]):
            wbits = zlib.MAX_WBITS  # reads any window size the header names
        else:  # raw deflate, as some clients send
            wbits = -zlib.MAX_WBITS
        inflater = zlib.decompressobj(wbits)
        size = FEED_FIRST
        while not inflater.eof:
            if pos >= end:
                return error(400, "bad_encoding", f"the {coding} body is truncated")
            chunk = view[pos : pos + size]
            pos += len(chunk)
            size = min(size * 2, INFLATE_STEP)
            try:  # max_length >= 1 here (0 would mean no limit)
                out += inflater.decompress(chunk, limit + 1 - len(out))
            except zlib.error as exc:
                return error(
                    400,
                    "bad_encoding",
                    f"the body is not valid {coding} data as its Content-Encoding says ({exc})",
                )
            if len(out) > limit:  # also whenever output was cut short (unconsumed_tail)
                return error(
                    413,
                    "body_too_large",
                    f"the body inflates to more than the limit of {limit} bytes",
                )
        pos -= len(inflater.unused_data)
        if pos == end or (coding != "deflate" and only_nul_padding(body, pos)):
            return bytes(out)  # the end, or NUL padding after the last gzip member
        if coding == "deflate":
            return error(
                400,
                "bad_encoding",
                f"{end - pos} bytes follow the end of the deflate data; send only the "
                "compressed body",
            )


def _zlib_header(data: bytes) -> bool:
    """A zlib stream's two header bytes (RFC 1950: method 8, window <= 32K, check bits), not
    only the usual 0x78: zlib with a smaller window starts 0x08..0x68."""
    return (
        len(data) >= 2
        and data[0] & 0x0F == 8
        and data[0] >> 4 <= 7
        and ((data[0] << 8) | data[1]) % 31 == 0
    )


def split_records(body: bytes, content_type: str) -> tuple[list[bytes] | Response, int]:
    """One JSON value, a JSON array of objects, or NDJSON -> one byte string per record.

    A JSON body that does not parse is refused whole (400). NDJSON is taken line by line: if
    no line parses it is refused (400); otherwise malformed lines are kept, so the pipeline
    DLQs each one with its bytes and the sender can see exactly which.
    """
    lines, malformed, _ = split_values(body, content_type)
    return lines, malformed


def split_values(body: bytes, content_type: str) -> tuple[list[bytes] | Response, int, list[Any]]:
    """`split_records`, plus each line's parsed value (`NOT_JSON` for a malformed line): the
    door keys each line by its entity (ingest.webhook.spread) from what was parsed here
    anyway, without parsing the body a second time."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype not in _NDJSON_TYPES:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if b"\n" in body.strip() and ctype != "application/json":
                return _split_ndjson(body)
            return error(400, "invalid_json", f"body is not JSON: {exc}"), 0, []
        if isinstance(value, list):
            if not value:
                return error(400, "empty_array", "the JSON array holds no records"), 0, []
            try:
                lines = [_one_line(bytes(raw)) for raw in _RAW_ARRAY.decode(body)]
            except (msgspec.DecodeError, RecursionError):  # an element nested too deep for it
                lines = [_one_line(e) for e in _array_elements(body)]
            if len(lines) != len(value):  # never seen; keyed by their bytes then
                return lines, 0, [NOT_JSON] * len(lines)
            return lines, 0, value
        return [_one_line(body.strip())], 0, [value]
    return _split_ndjson(body)


def _array_elements(body: bytes) -> list[bytes]:
    """The elements of a JSON array `body` that orjson parsed, as the exact bytes sent, when
    an element is nested deeper than msgspec recurses (~1,000 levels; orjson reads 1,024).
    The fallback before re-serialized the elements with orjson, which refuses to write more
    than 255 levels: a 500 with a traceback (and its siblings' integers beyond 64 bits would
    have become floats). The deep element goes on to the decoder, which rejects it."""
    out: list[bytes] = []
    depth, start = 0, 0
    for m in _TOKENS.finditer(body):
        c = body[m.start()]
        if c == 0x22:  # a string: nothing structural in it
            continue
        if c in b"[{":
            depth += 1
            if depth == 1:
                start = m.end()
        elif c in b"]}":
            depth -= 1
            if depth == 0:
                out.append(body[start : m.start()].strip())
                break
        elif depth == 1:  # a comma between two elements
            out.append(body[start : m.start()].strip())
            start = m.end()
    return out


def _one_line(value: bytes) -> bytes:
    """A JSON value that parsed, on one line: a CR or LF in valid JSON can only be whitespace
    between tokens (inside strings they must be escaped), so a pretty-printed record is the
    same record with spaces, and the intake stores one record per line."""
    if b"\n" in value or b"\r" in value:
        return value.replace(b"\r", b" ").replace(b"\n", b" ")
    return value


def _split_ndjson(body: bytes) -> tuple[list[bytes] | Response, int, list[Any]]:
    lines = [ln.strip() for ln in body.splitlines()]
    lines = [ln for ln in lines if ln]
    values: list[Any] = []
    malformed = 0
    for ln in lines:
        try:
            values.append(orjson.loads(ln))
        except orjson.JSONDecodeError:
            values.append(NOT_JSON)
            malformed += 1
    if malformed == len(lines):
        return error(400, "invalid_json", "no line of the body is JSON (expected NDJSON)"), 0, []
    return lines, malformed, values
