"""Importing aiohttp without reading the system's CA store twice.

aiohttp builds two SSL contexts when it is imported (`aiohttp.connector._SSL_CONTEXT_VERIFIED`
and `_UNVERIFIED`), each reading the system's CA bundle: ~60 ms of CPU, in a pod's fork
server on the path to its first fork (~0.7 s of CPU in all). They are aiohttp's defaults for a
request that brings no context of its own; aiobotocore, its only user here, builds one for
every connection (`AIOHTTPSession._build_ssl_contexts`: the CA bundle botocore is configured
with, or no verification for `verify=False`), so neither default is ever used by an S3 client.
Built without the CA store, the verifying default fails closed (no certificate verifies
against it), never open.
"""

from __future__ import annotations

import contextlib
import ssl
import sys
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def no_default_ca_store() -> Iterator[None]:
    """While aiohttp is first imported: SSL contexts made by `ssl.create_default_context`
    or given the default verify paths get no CA certificates. Nothing changes when aiohttp is
    already imported; the functions are restored after."""
    if "aiohttp" in sys.modules:
        yield
        return
    create, default_paths = ssl.create_default_context, ssl.SSLContext.set_default_verify_paths

    def bare_context(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies hostnames and certificates

    ssl.create_default_context = bare_context
    ssl.SSLContext.set_default_verify_paths = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        ssl.create_default_context = create
        ssl.SSLContext.set_default_verify_paths = default_paths  # type: ignore[method-assign]
