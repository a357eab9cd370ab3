"""Bytes and None bound to SQLite without the sqlite3 module's failed adaptation attempt.

CPython's `sqlite3` binds int, float, str and bytearray as they are, but sends every other
parameter through its adapter protocol first: an adapters-dict lookup, then `__adapt__` and
`__conform__` looked up, each raising an AttributeError that is cleared (~3,300 instructions
a parameter). Our stores bind a 32-byte dedupe key (bytes) and NULLs for every record, so
that was ~13 % of the sink's write (embu, docs/benchmarks.md). An adapter registered for the
exact type is found by the first lookup: bytes and None pass through unchanged, as before.

Importing this module registers them for the whole process (the sqlite3 module keeps its
adapters per process); every module that opens an SQLite store imports it.
"""

from __future__ import annotations

import sqlite3


def _none(value: None) -> None:
    return value


sqlite3.register_adapter(bytes, bytes)  # bytes(b) is b itself for an exact bytes
sqlite3.register_adapter(type(None), _none)
