"""An object's GET sent by this source itself, signed as botocore signs it, for the common case.

A GET through aiobotocore costs ~1.25-1.6 ms of CPU (its request pipeline: parameter
validation, endpoint rules, a dozen event hooks, the user agent rebuilt, the response parsed
into a dict), against ~0.45-0.6 ms for the same GET signed with botocore's own SigV4 signer and
sent on the client's own aiohttp session (100 objects of 1,000 lines, alternated, 4 rounds):
~0.85 µs a record of a 1,000-line object, ~6 % of an S3 pod's CPU a record.

What botocore would send is learnt, never guessed: the first GET of a client goes through
botocore, and its prepared request (`before-send`) gives the URL (endpoint, addressing style,
the key's encoding), the signing region and service (the Authorization's scope), the user
agent and whether response checksums are asked for. A GET here sends the same request to
`base + percent_encode(key)` with the same credentials, signed now. Anything it does not
mirror stays botocore's: an answer other than 200/206 (412 of a replaced object, 404, 403,
5xx: botocore asks again and raises, retries and error codes as before), a connection error
before the first byte (botocore's retries), a proxy, a non-SigV4 signature, no credentials.
The body's checksum is checked as botocore checks it (the first header of its algorithms, in
its order; none for a composite `-N` one).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncGenerator, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from botocore import httpchecksum  # type: ignore[import-untyped]
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.exceptions import FlexibleChecksumError  # type: ignore[import-untyped]
from botocore.utils import percent_encode  # type: ignore[import-untyped]
from yarl import URL

_SCOPE = re.compile(r"^AWS4-HMAC-SHA256 Credential=[^/]+/\d{8}/([^/]+)/([^/]+)/aws4_request,")
_COPIED = ("User-Agent", "x-amz-checksum-mode")  # sent as botocore sent them
_OK = (200, 206)


def key_path(key: str) -> str:
    """The key as botocore puts it in a URL (a greedy label: '/' and '~' kept)."""
    return str(percent_encode(key, safe="/~"))


def base_of(url: str, bucket: str, path: str) -> bool:
    """`url` is the GET of `path` (encoded) in `bucket` and nothing else: path style
    (`<endpoint>/<bucket>/<path>`) or virtual-host style (`<bucket>.<host>/<path>`), no
    query, no path prefix of the endpoint's own (never guessed: such a client keeps
    botocore's GETs)."""
    parts = urlsplit(url)
    if parts.query or parts.fragment or not parts.path.endswith("/" + path):
        return False
    rest = parts.path[: len(parts.path) - len(path)]
    host = parts.hostname or ""
    return rest == f"/{bucket}/" or (rest == "/" and host.startswith(bucket + "."))


def checksum_algorithms(client: Any) -> list[str]:
    """The response checksums botocore checks on a GetObject, in the order it tries them."""
    op = client.meta.service_model.operation_model("GetObject")
    asked = {a.lower() for a in (op.http_checksum or {}).get("responseAlgorithms", [])}
    supported = httpchecksum._SUPPORTED_CHECKSUM_ALGORITHMS
    return [a for a in httpchecksum._ALGORITHMS_PRIORITY_LIST if a in asked and a in supported]


class DirectGet:
    """GETs of one client's bucket, sent as botocore sent `first` (see the module)."""

    def __init__(
        self,
        base: str,
        region: str,
        service: str,
        headers: Mapping[str, str],
        credentials: Any,
        session: aiohttp.ClientSession,
        algorithms: list[str],
    ) -> None:
        self._base, self._region, self._service = base, region, service
        self._headers = dict(headers)
        self._credentials = credentials
        self._session = session
        self._algorithms = algorithms if "x-amz-checksum-mode" in self._headers else []
        self.sent = 0  # GETs answered here (tests: the path was taken)

    @classmethod
    async def learn(cls, client: Any, bucket: str, key: str, request: Any) -> DirectGet | None:
        """From botocore's prepared GET of `key` in `bucket` on `client`: a DirectGet, or
        None when that request is not one this mirrors (or not the GET of that key: the
        URL's path must be exactly the bucket's and the key's, path or virtual-host style)."""
        url = str(request.url)
        path = key_path(key)
        if not base_of(url, bucket, path):
            return None
        auth = request.headers.get("Authorization")
        if isinstance(auth, bytes):
            auth = auth.decode()
        scope = _SCOPE.match(auth or "")
        if scope is None:
            return None
        credentials = client._request_signer._credentials
        http = client._endpoint.http_session
        frozen = getattr(credentials, "get_frozen_credentials", None)
        if not inspect.iscoroutinefunction(frozen) or http._proxy_config.proxy_url_for(url):
            return None
        headers = {}
        for name in _COPIED:
            value = request.headers.get(name)
            if value is not None:
                headers[name] = value.decode() if isinstance(value, bytes) else str(value)
        session = await http._get_session(None)
        return cls(
            url[: len(url) - len(path)],
            scope.group(1),
            scope.group(2),
            headers,
            credentials,
            session,
            checksum_algorithms(client),
        )

    async def get(self, key: str, extra: Mapping[str, str]) -> aiohttp.ClientResponse | None:
        """The 200/206 answer to a GET of `key` with the `extra` headers (If-Match, Range),
        or None: not answered here (an error status, a connection error): ask botocore."""
        url = self._base + key_path(key)
        request = AWSRequest("GET", url, headers={**self._headers, **extra})
        frozen = await self._credentials.get_frozen_credentials()
        S3SigV4Auth(frozen, self._service, self._region).add_auth(request)
        headers = {
            k: (v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()
        }
        headers["Accept-Encoding"] = "identity"  # the bytes as stored: as aiobotocore asks
        try:
            # a 3xx too is botocore's (its S3 region redirects), never followed here with
            # the signed headers
            response = await self._session.get(
                URL(url, encoded=True), headers=headers, allow_redirects=False
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None  # botocore's to retry and to report
        if response.status not in _OK:
            response.release()
            return None
        self.sent += 1
        return response

    async def body(
        self, response: aiohttp.ClientResponse, size: int
    ) -> AsyncGenerator[bytes, None]:
        """The answer's bytes in chunks of up to `size`, its checksum checked at the end as
        botocore checks it."""
        check = BodyChecksum.of(self._algorithms, response.headers)
        try:
            while chunk := await response.content.read(size):
                if check is not None:
                    check.update(chunk)
                yield chunk
        finally:
            response.release()
        if check is not None:
            check.verify()


class BodyChecksum:
    """A GET's body checked against the checksum header botocore would check: the first of
    `algorithms` (its order) the answer has, skipping a composite (multipart, `-N`) one as
    botocore does; a mismatch raises botocore's error."""

    def __init__(self, algorithm: str, expected: str) -> None:
        self._sum = httpchecksum._CHECKSUM_CLS[algorithm]()
        self.algorithm, self.expected = algorithm, expected

    @classmethod
    def of(cls, algorithms: list[str], headers: Mapping[str, str]) -> BodyChecksum | None:
        for algorithm in algorithms:
            value = headers.get(f"x-amz-checksum-{algorithm}")
            if value is not None and "-" not in value:
                return cls(algorithm, value)
        return None

    def update(self, chunk: bytes) -> None:
        self._sum.update(chunk)

    def verify(self) -> None:
        got = self._sum.b64digest()
        if got != self.expected:
            raise FlexibleChecksumError(
                error_msg=f"Expected checksum {self.expected} did not match calculated"
                f" checksum: {got}"
            )
