"""The compiled extension's optional helpers (`ingest_native`, built from ingest_native/ by
`make install`): each one has a Python twin that runs where the extension is missing, older
than the helper, or turned off by INGEST_NO_EXTENSION. The decoder loads its own fast path
(`ingest.pipeline.decode`), since it also reports why it runs without it."""

from __future__ import annotations

import os
from typing import Any


def function(name: str) -> Any | None:
    """`ingest_native.<name>`, or None where the Python twin must run instead."""
    if os.environ.get("INGEST_NO_EXTENSION"):
        return None
    try:
        import ingest_native  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return getattr(ingest_native, name, None)
