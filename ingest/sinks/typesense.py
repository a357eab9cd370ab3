"""Typesense sink: one collection per tenant and entity type, one document per entity.

Typesense has no conditional write, so the revision guard is read-then-write: export the
stored revisions of the batch's ids, then `import` (action=upsert) only the winners that are
newer. That is safe under the pipeline's per-key ordering (all records of one entity flow
through one source partition, in order, so one writer at a time per entity); it does NOT
protect against two concurrent writers of one id, which can race between the read and the
write (the later import wins). Deletes are tombstone documents (`deleted: true` plus the
revision), so the guard sees them like any other revision. For replays (sinks/base.py)
every document also keeps `_dedupe_key` (hex) and `_prev_revision` (the revision stored
before it was written), stored but not declared in the schema, so collections created
before them need no change (absent -> None). See docs/sinks.md.

The official client's AsyncClient (typesense>=2) is used directly: no threads, no raw HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, cast
from urllib.parse import quote

import httpx
import orjson
import typesense
from typesense.exceptions import (
    HTTPStatus0Error,
    ObjectAlreadyExists,
    ObjectNotFound,
    RequestForbidden,
    RequestUnauthorized,
    ServerError,
    ServiceUnavailable,
    TypesenseClientError,
)
from typesense.types.collection import CollectionCreateSchema, CollectionUpdateSchema

from ingest.config import TypesenseField
from ingest.errors import SinkError
from ingest.records import ReasonCode, Record, SinkResult
from ingest.sinks.base import (
    EntityKey,
    StoredRow,
    judge_batch,
    latest_per_entity,
    retry_after_seconds,
    write_around_refused,
)

_FIXED_FIELDS: tuple[dict[str, Any], ...] = (
    {"name": "entity_id", "type": "string"},
    {"name": "revision", "type": "int64"},
    {"name": "deleted", "type": "bool", "facet": True},
    {"name": "occurred_at", "type": "string", "optional": True, "index": False},
)
# Replay fields (sinks/base.py), written by the sink into every document. Deliberately not
# declared: Typesense stores undeclared fields as they are, whereas declaring them would
# alter every existing collection (0.24.1 refuses that if an old document carries an
# attribute of that name with another type), and they are never searched.
_REPLAY_FIELDS = {"_dedupe_key": "string", "_prev_revision": "int64"}
_RESERVED = frozenset({"id", *(f["name"] for f in _FIXED_FIELDS), *_REPLAY_FIELDS})
_ZERO: dict[str, Any] = {"string": "", "int32": 0, "int64": 0, "float": 0.0, "bool": False}
_PLAIN = re.compile(r"[A-Za-z0-9-]+(?:_[A-Za-z0-9-]+)*")


def collection_name(tenant: str, entity_type: str) -> str:
    """`<tenant>__<entity_type>`; a part that is not plain gets a hash so names never clash."""

    def part(s: str) -> str:
        if _PLAIN.fullmatch(s) and len(s) <= 60:
            return s
        digest = hashlib.sha256(s.encode()).hexdigest()[:10]
        return f"{re.sub(r'[^A-Za-z0-9-]', '-', s)[:40]}-{digest}"

    return f"{part(tenant)}__{part(entity_type)}"


def _stored_row(doc: Mapping[str, Any]) -> StoredRow:
    """(revision, dedupe_key, prev_revision) of a stored document; a replay field that is
    absent (written before it existed) or not of the sink's making is None."""
    key: bytes | None = None
    raw_key = doc.get("_dedupe_key")
    if isinstance(raw_key, str):
        with contextlib.suppress(ValueError):
            key = bytes.fromhex(raw_key)
    prev = doc.get("_prev_revision")
    return (
        int(doc["revision"]),
        key,
        prev if isinstance(prev, int) and not isinstance(prev, bool) else None,
    )


def _classify(exc: Exception, target: str) -> SinkError:
    """One place that turns client/transport errors into the pipeline's reason codes."""
    name = type(exc).__name__
    status = exc.args[0] if isinstance(exc, TypesenseClientError) and exc.args else None
    msg = f"typesense at {target}: {exc}"
    if status == 429:  # honoured: the worker waits at least the server's Retry-After
        hint = exc.retry_after if isinstance(exc, _TooManyRequests) else None
        return SinkError(
            ReasonCode.RATE_LIMITED, msg, retry_after=hint, error_class=name, status=429
        )
    if isinstance(exc, ServiceUnavailable | ServerError | httpx.TimeoutException):
        return SinkError(ReasonCode.SINK_TIMEOUT, msg, error_class=name, status=status)
    if isinstance(exc, HTTPStatus0Error | RequestUnauthorized | RequestForbidden):
        return SinkError(ReasonCode.CONNECTION_ERROR, msg, error_class=name, status=status)
    if isinstance(exc, TypesenseClientError):  # 4xx on a whole request: it will not succeed
        return SinkError(ReasonCode.CONSTRAINT_VIOLATION, msg, error_class=name, status=status)
    return SinkError(ReasonCode.CONNECTION_ERROR, msg, error_class=name)  # refused, reset, DNS


_TRANSPORT_ERRORS = (TypesenseClientError, httpx.HTTPError, OSError)


class _TooManyRequests(TypesenseClientError):
    """A 429, raised from the HTTP client's response hook so that the server's Retry-After
    survives: the client's own exceptions carry only the status and the message."""

    def __init__(self, retry_after: float | None) -> None:
        super().__init__(429, "rate limited by the server")
        self.retry_after = retry_after


async def _keep_retry_after(response: httpx.Response) -> None:
    if response.status_code == 429:
        raise _TooManyRequests(retry_after_seconds(response.headers.get("retry-after")))


class TypesenseSink:
    """Guarded batch upserts of entity documents into Typesense collections."""

    kind = "typesense"

    def __init__(
        self,
        name: str,
        url: str,
        api_key: str,
        fields: Mapping[str, Sequence[TypesenseField]],
        timeout_seconds: float = 10.0,
    ) -> None:
        self.name = name
        self._url = url
        self._fields = fields
        parsed = httpx.URL(url)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_seconds), event_hooks={"response": [_keep_retry_after]}
        )
        self._client = typesense.AsyncClient(
            {
                "api_key": api_key,
                "nodes": [
                    {
                        "host": parsed.host,
                        "port": parsed.port or (443 if parsed.scheme == "https" else 80),
                        "protocol": parsed.scheme,
                    }
                ],
                "connection_timeout_seconds": timeout_seconds,
                "num_retries": 0,  # the worker owns retries and the breaker
            },
            http_client=self._http,
        )
        self._ready: set[str] = set()

    async def start(self) -> None:
        """Collections are created lazily (tenants appear at run time); check the server."""
        try:
            await self._client.operations.is_healthy()
        except _TRANSPORT_ERRORS as exc:
            raise _classify(exc, self._url) from exc

    async def close(self) -> None:
        await self._client.api_call.aclose()
        await self._http.aclose()  # passed in, so the client leaves it open

    async def health(self) -> dict[str, Any]:
        try:
            ok = bool(await self._client.operations.is_healthy())
        except Exception as exc:  # health reports, never raises
            return {"connected": False, "target": self._url, "error": str(exc)}
        return {"connected": ok, "target": self._url}

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        """A rejected document fails alone (sinks/base.py `write_around_refused`)."""
        if not records:
            return []
        return await write_around_refused(records, self._write_once)

    async def _write_once(
        self, records: Sequence[Record]
    ) -> tuple[list[SinkResult], dict[EntityKey, SinkResult]]:
        groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
        for rec in latest_per_entity(records):
            groups[(rec.tenant, rec.entity_type)].append(rec)
        stored: dict[EntityKey, StoredRow] = {}
        refused: dict[EntityKey, dict[str, Any]] = {}
        try:
            for (tenant, etype), winners in groups.items():
                coll = await self._collection(tenant, etype)
                rows = await self._stored_rows(coll, [r.entity_id for r in winners])
                newer: list[tuple[Record, int | None]] = []
                for rec in winners:
                    row = rows.get(rec.entity_id)
                    if row is not None:
                        stored[rec.entity_key] = row
                    if row is None or rec.revision > row[0]:
                        newer.append((rec, None if row is None else row[0]))
                if newer:
                    refused |= await self._import(coll, newer)
        except _TRANSPORT_ERRORS as exc:
            raise _classify(exc, self._url) from exc
        failed = {
            key: SinkResult.failed(ReasonCode.CONSTRAINT_VIOLATION, **detail)
            for key, detail in refused.items()
        }
        return judge_batch(records, stored), failed

    def _document(self, rec: Record, prev_revision: int | None = None) -> dict[str, Any]:
        """The document stored for `rec`; `prev_revision` is the revision it replaces."""
        body = rec.body
        doc: dict[str, Any] = {}
        if rec.deleted:  # a tombstone carries no content; required fields get zero values
            for f in self._fields.get(rec.entity_type, ()):
                if not f.optional and f.name not in _RESERVED:
                    doc[f.name] = [] if f.type.endswith("[]") else _ZERO.get(f.type, "")
        else:
            doc.update((k, v) for k, v in (body.get("attributes") or {}).items() if v is not None)
        for key in _RESERVED & doc.keys():
            del doc[key]  # the fixed fields win over attributes of the same name
        doc.update(
            id=rec.entity_id,
            entity_id=rec.entity_id,
            revision=rec.revision,
            deleted=rec.deleted,
            _dedupe_key=rec.dedupe_key.hex(),
        )
        if prev_revision is not None:
            doc["_prev_revision"] = prev_revision
        if body.get("occurred_at") is not None:
            doc["occurred_at"] = str(body["occurred_at"])
        return doc

    async def _import(
        self, coll: str, items: list[tuple[Record, int | None]]
    ) -> dict[EntityKey, dict[str, Any]]:
        """Upsert each record (with the revision it replaces); returns the refused entities
        with the document and the server's message."""
        recs = [rec for rec, _ in items]
        docs = [orjson.dumps(self._document(rec, prev)) for rec, prev in items]
        try:
            text = await self._client.collections[coll].documents.import_(
                b"\n".join(docs), {"action": "upsert"}
            )
        except ObjectNotFound:  # collection dropped under us: recreate once
            self._ready.discard(coll)
            await self._collection(recs[0].tenant, recs[0].entity_type)
            text = await self._client.collections[coll].documents.import_(
                b"\n".join(docs), {"action": "upsert"}
            )
        refused: dict[EntityKey, dict[str, Any]] = {}
        for rec, doc, line in zip(recs, docs, text.split("\n"), strict=True):
            item = orjson.loads(line)
            if not item.get("success"):
                refused[rec.entity_key] = {
                    "message": str(item.get("error")),
                    "code": item.get("code"),
                    "document": doc.decode(),
                    "collection": coll,
                }
        return refused

    async def _stored_rows(self, coll: str, ids: list[str]) -> dict[str, StoredRow]:
        """(revision, dedupe_key, prev_revision) per stored id; the replay fields are None in
        documents written before they existed. Ids with a backtick cannot be quoted in
        filter_by (0.24): those few are read one by one."""
        plain = [i for i in ids if "`" not in i]
        found: dict[str, StoredRow] = {}
        for k in range(0, len(plain), 2000):
            chunk = plain[k : k + 2000]
            text = await self._client.collections[coll].documents.export(
                {
                    "filter_by": "entity_id:=[" + ",".join(f"`{i}`" for i in chunk) + "]",
                    "include_fields": "id,revision," + ",".join(_REPLAY_FIELDS),
                }
            )
            for line in text.splitlines():
                if line:
                    doc = orjson.loads(line)
                    found[doc["id"]] = _stored_row(doc)
        for odd in (i for i in ids if "`" in i):
            got = await self._get(coll, odd)
            if got is not None:
                found[odd] = _stored_row(got)
        return found

    async def _collection(self, tenant: str, entity_type: str) -> str:
        """Create the collection at first use, or check that an existing one fits."""
        name = collection_name(tenant, entity_type)
        if name in self._ready:
            return name
        wanted = [*_FIXED_FIELDS, *self._config_fields(entity_type)]
        try:
            schema = await self._client.collections[name].retrieve()
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another worker was first
                await self._client.collections.create(
                    cast(CollectionCreateSchema, {"name": name, "fields": wanted})
                )
            schema = await self._client.collections[name].retrieve()
        have = {f["name"]: f["type"] for f in schema["fields"]}
        expected = {f["name"]: f["type"] for f in _FIXED_FIELDS}
        # Replay fields are undeclared; a collection that declares them must agree on types.
        expected |= {n: t for n, t in _REPLAY_FIELDS.items() if n in have}
        for field, ftype in expected.items():
            if have.get(field) != ftype:
                raise SinkError(
                    ReasonCode.CONSTRAINT_VIOLATION,
                    f"collection {name} has {field}: {have.get(field)}, expected {ftype}",
                    collection=name,
                )
        missing = [f for f in wanted if f["name"] not in have]
        if missing:  # fields added to the config later: extend the schema in place
            await self._client.collections[name].update(
                cast(CollectionUpdateSchema, {"fields": missing})
            )
        self._ready.add(name)
        return name

    def _config_fields(self, entity_type: str) -> list[dict[str, Any]]:
        return [
            {"name": f.name, "type": f.type, "optional": f.optional, "facet": f.facet}
            for f in self._fields.get(entity_type, ())
            if f.name not in _RESERVED
        ]

    async def _get(self, coll: str, entity_id: str) -> dict[str, Any] | None:
        # The client puts the id into the path as it is: `/`, `?`, `#`, `%` or a control
        # character would read another document, or none (then the guard saw nothing stored).
        path_id = quote(entity_id, safe="")
        try:
            doc = await self._client.collections[coll].documents[path_id].retrieve()
        except ObjectNotFound:
            return None
        return dict(doc)

    async def fetch(self, tenant: str, entity_type: str, entity_id: str) -> dict[str, Any] | None:
        """The stored document (a tombstone has `deleted: true`), or None."""
        try:
            return await self._get(collection_name(tenant, entity_type), entity_id)
        except _TRANSPORT_ERRORS as exc:
            raise _classify(exc, self._url) from exc

    async def count(self, tenant: str, entity_type: str) -> int:
        """Live (not deleted) documents of one tenant and entity type."""
        try:
            res = await self._client.collections[
                collection_name(tenant, entity_type)
            ].documents.search(
                {"q": "*", "query_by": "entity_id", "filter_by": "deleted:false", "per_page": 0}
            )
        except ObjectNotFound:
            return 0
        except _TRANSPORT_ERRORS as exc:
            raise _classify(exc, self._url) from exc
        return int(res["found"])
