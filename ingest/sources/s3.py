"""S3 source: every object under `s3://bucket/prefix/`, read once per ETag, streamed by line.

Each poll lists the whole prefix (following continuation tokens) instead of resuming after
the last key seen: S3 keys are not written in key order, so a "start after" cursor would miss
an object that sorts below ones already processed or becomes visible late. The done-set of
(key, ETag) in the lease store makes the full listing cheap to filter; a changed ETag is a new
version and is read again. GETs carry `If-Match: <etag>` so the bytes read are the version
leased; a replaced object fails the GET and is picked up, as its new version, by the next pass.
Endpoint, region and credentials come from the config or the standard AWS variables.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
from collections.abc import AsyncGenerator
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlparse

import botocore.loaders  # type: ignore[import-untyped]
import botocore.session  # type: ignore[import-untyped]
import botocore.utils  # type: ignore[import-untyped]
import orjson

from ingest.sources.s3_imports import without_httpx
from ingest.sources.tls import no_default_ca_store

with no_default_ca_store(), without_httpx():  # neither is ever used by this source
    from aiobotocore.session import get_session
from botocore.config import Config as BotoConfig  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    DataNotFoundError,
)

from ingest.config import S3SourceConfig
from ingest.sources.objects import ItemRef, ItemSource, SourceFailure, backoff
from ingest.sources.s3_direct import DirectGet

ObjectRef = ItemRef  # name = key, version = ETag (unquoted), mtime = LastModified


class _S3Loader(botocore.loaders.Loader):  # type: ignore[misc]
    """botocore's loader, for a process whose clients are all S3 clients. Before loading a
    model, botocore's asks which services exist: it walks every one of the ~400 service
    directories of its data, once for each kind of file (service model, paginators, endpoint
    rules), ~1,200 directory listings: ~35 ms of the fork server's ~0.7 s of CPU before it
    forks the first worker (the models themselves: ~70 ms). Here the answer is S3 when its
    data has that kind of file, found as botocore finds it (`list_api_versions`)."""

    def list_available_services(self, type_name: str) -> list[str]:
        try:
            self.list_api_versions("s3", type_name)
        except DataNotFoundError:
            return []
        return ["s3"]


class _OrjsonFileLoader(botocore.loaders.JSONFileLoader):  # type: ignore[misc]
    """botocore's model files parsed by orjson: botocore's `json.loads` with an OrderedDict
    for every object took ~43 of the ~57 ms its loader spent on S3's files (endpoints.json,
    S3's service model and endpoint rules), orjson ~17, in a pod's fork server on the path to
    its first fork. Plain dicts keep the files' key order as OrderedDicts did. The files are
    found as botocore finds them (`name.json`, then `name.json.gz`); one orjson refuses (or
    any other layout) is botocore's to load."""

    def load_file(self, file_path: str) -> Any:
        for ext, opener in ((".json", open), (".json.gz", gzip.open)):
            path = file_path + ext
            if os.path.isfile(path):
                with opener(path, "rb") as fp:
                    payload = fp.read()
                try:
                    return orjson.loads(payload)
                except orjson.JSONDecodeError:
                    break
        return super().load_file(file_path)


# One loader of botocore's JSON models (S3's service model, endpoints, partitions, ...) for
# every client of the process: a new session parses them again (~0.1 s of CPU a client).
# A pod's fork server fills it before it forks workers (`preload_models`), so each worker's
# first client, on the path from its start to its first listing, costs ~0.02 s.
_LOADER = _S3Loader(file_loader=_OrjsonFileLoader())


def preload_models() -> None:
    """Parse the models an S3 client needs into `_LOADER`, as a throwaway botocore client
    does: no connection, no thread (building a client sends nothing)."""
    session = botocore.session.Session()
    session.register_component("data_loader", _LOADER)
    client = session.create_client(
        "s3", region_name="us-east-1", aws_access_key_id="-", aws_secret_access_key="-"
    )
    client.get_paginator("list_objects_v2")
    client.close()


# An HTTP date in RFC 9110's preferred form, what S3 sends (older forms go to botocore's)
_IMF_FIXDATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")


def parse_timestamp(value: Any) -> datetime:
    """A timestamp of a response, as botocore's parser returns it (an aware datetime). S3's
    XML gives ISO 8601 in UTC ('2026-12-02T15:20:14.000Z'), which the standard library reads
    in ~0.2 µs; botocore's default (dateutil) took ~0.3 ms, 200 of them (a listing of the
    bench's 200 objects) ~60 % of the listing's CPU, on each worker's path to its first
    record. Every GET's Last-Modified header is an HTTP date ('Wed, 02 Dec 2026 15:20:14
    GMT'): the standard library's RFC 5322 parser reads it in ~5 µs (dateutil ~0.4 ms, a GET
    an object). Anything else (a naive time, epoch seconds) goes to botocore's."""
    if isinstance(value, str):
        try:
            parsed = (
                parsedate_to_datetime(value)
                if _IMF_FIXDATE.fullmatch(value)
                else datetime.fromisoformat(value)
            )
        except (ValueError, TypeError, IndexError):
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed
    return botocore.utils.parse_timestamp(value)  # type: ignore[no-any-return]


def plain_http(endpoint_url: str | None) -> bool:
    """An endpoint reached without TLS (a local MinIO/SeaweedFS, a sidecar): its client needs
    no certificate store. With verification on, aiobotocore loads the CA bundle into an SSL
    context on the first request anyway (~0.06 s of CPU quiet, 0.25 s of wall at load 7, on
    each worker's path to its first listing) that a plain-HTTP connection never uses."""
    return endpoint_url is not None and endpoint_url.lower().startswith("http://")


_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix/` -> ("bucket", "prefix/")."""
    parts = urlparse(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3:// URL: {url!r}")
    return parts.netloc, parts.path.lstrip("/")


class S3Source(ItemSource[S3SourceConfig]):
    kind = "s3"
    name_field = "key"
    version_field = "etag"

    def setup(self) -> None:
        self.bucket, self.prefix = parse_s3_url(self.cfg.url)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        # GETs sent by this source once botocore's first one showed how (`s3_direct`)
        self._direct: DirectGet | None = None
        self._prepared: dict[str, Any] = {}  # URL -> botocore's prepared GET, until learnt
        self._lessons = 3  # GETs botocore answers before giving up on learning (a proxy, ...)

    async def _s3(self) -> Any:
        if self._client is None:
            kwargs: dict[str, Any] = {
                "config": BotoConfig(
                    connect_timeout=5,
                    read_timeout=60,
                    retries={"max_attempts": 3, "mode": "standard"},
                    max_pool_connections=16,
                )
            }
            for key, value in (
                ("endpoint_url", self.cfg.endpoint_url),
                ("region_name", self.cfg.region),
                ("aws_access_key_id", self.cfg.access_key_id),
                ("aws_secret_access_key", self.cfg.secret_access_key),
            ):
                if value:
                    kwargs[key] = value
            if plain_http(self.cfg.endpoint_url):
                kwargs["verify"] = False  # nothing to verify: no TLS
            session = get_session()
            session.register_component("data_loader", _LOADER)
            parsers = session.get_component("response_parser_factory")
            parsers.set_parser_defaults(timestamp_parser=parse_timestamp)
            creator = session.create_client("s3", **kwargs)
            self._client = await self._stack.enter_async_context(creator)
            self._client.meta.events.register("before-send.s3.GetObject", self._note_get)
        return self._client

    def _note_get(self, request: Any, **_: Any) -> None:
        """botocore's GET, about to be sent: what `DirectGet.learn` reads (nothing changes)."""
        if self._direct is None and self._lessons and len(self._prepared) < 8:
            self._prepared[str(request.url)] = request

    async def list_items(self) -> list[ObjectRef]:
        s3 = await self._s3()
        refs: list[ObjectRef] = []
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", ()):
                if obj["Key"].endswith("/"):
                    continue  # "directory" marker
                refs.append(
                    ItemRef(
                        name=obj["Key"],
                        version=str(obj["ETag"]).strip('"'),
                        size=int(obj["Size"]),
                        mtime=obj["LastModified"].timestamp(),
                    )
                )
        self._failures = 0
        return refs

    async def list_window(self, start: float, end: float) -> list[ObjectRef]:
        """Objects with LastModified in [start, end), oldest first: what a replay re-reads."""
        return await self.window(start, end)

    async def open_item(self, ref: ItemRef, start: int) -> AsyncGenerator[bytes, None]:
        s3 = await self._s3()
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": ref.name,
            "IfMatch": f'"{ref.version}"',
        }
        if start:
            args["Range"] = f"bytes={start}-"
        direct = self._direct
        if direct is not None:
            extra = {"If-Match": args["IfMatch"]}
            if start:
                extra["Range"] = args["Range"]
            answer = await direct.get(ref.name, extra)
            if answer is not None:
                async with contextlib.aclosing(direct.body(answer, self._chunk)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
        resp = await s3.get_object(**args)
        if direct is None and self._lessons:
            await self._learn(s3, ref.name)
        async with resp["Body"] as body:
            while chunk := await body.read(self._chunk):
                yield chunk

    async def _learn(self, s3: Any, key: str) -> None:
        """After botocore's GET of `key` was answered: how to send the next ones here."""
        prepared, self._prepared = self._prepared, {}
        self._lessons -= 1
        for request in prepared.values():
            with contextlib.suppress(Exception):  # not learnt: botocore's GETs go on
                self._direct = await DirectGet.learn(s3, self.bucket, key, request)
            if self._direct is not None:
                return

    def describe(self, exc: Exception) -> SourceFailure:
        self._failures += 1
        where = f"s3://{self.bucket}/{self.prefix}"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _AUTH_CODES:  # not fixed by retrying soon: retry slowly
                return SourceFailure(f"S3 refused access to {where}: {code}: {exc}", 30.0)
            if code in ("PreconditionFailed", "412", "NoSuchKey"):
                return SourceFailure(
                    f"object changed or removed while reading ({code}): {exc}", 0.1
                )
            return SourceFailure(f"S3 error on {where}: {code}: {exc}", backoff(self._failures))
        if (
            isinstance(exc, (BotoCoreError, OSError, TimeoutError))
            or "aiohttp" in type(exc).__module__
        ):
            return SourceFailure(
                f"CONNECTION_ERROR: S3 at {self.cfg.endpoint_url or 'AWS'} unreachable"
                f" ({type(exc).__name__}: {exc})",
                backoff(self._failures),
                unreachable=True,
            )
        return SourceFailure(f"{type(exc).__name__}: {exc}", backoff(self._failures))

    async def close_client(self) -> None:
        await self._stack.aclose()
        self._client = None
        self._direct, self._lessons = None, 3  # its session was the client's
        self._stack = contextlib.AsyncExitStack()
