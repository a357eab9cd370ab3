"""Importing aiobotocore without httpx, its optional backend, which an S3 source never uses.

aiobotocore imports httpx (or httpx2) at its own import for an optional HTTP backend. An S3
source's clients run on aiohttp, and `ingest.sources.s3_direct` sends on their aiohttp session;
with httpx absent aiobotocore records the backend as unavailable and works as before. httpx
and anyio cost ~15-30 ms of CPU in a pod's fork server, on the path to its first fork
(callgrind: 69 M of the preload's 2,374 M instructions; docs/benchmarks.md, s3up).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def without_httpx() -> Iterator[None]:
    """While aiobotocore is first imported: httpx and httpx2 absent (an import of either
    raises ImportError). Only that import sees them absent: a later `import httpx` (the
    Typesense sink, replays) imports it as usual; an httpx imported before stays as it is."""
    hidden = [name for name in ("httpx2", "httpx") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
