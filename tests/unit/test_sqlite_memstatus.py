"""SQLite's memory statistics are turned off by the first store import, and only when no SQLite
allocation is alive in the process (`ingest.state.sqlite._without_memory_statistics`). Each
case runs in a fresh interpreter: the setting is the process's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_COUNTS = """
import ctypes, sqlite3, _sqlite3
used = ctypes.PyDLL(_sqlite3.__file__).sqlite3_memory_used
used.restype = ctypes.c_int64
def counts():
    before = used()
    extra = sqlite3.connect(":memory:")
    moved = used() != before
    extra.close()
    return moved
def table():
    c = sqlite3.connect(":memory:")
    c.execute("CREATE TABLE t (v)")
    return c
def report(S, c, *more):
    c.execute("INSERT INTO t VALUES ('x')")
    print(S.MEMORY_STATISTICS_OFF, *more, c.execute("SELECT v FROM t").fetchone()[0])
"""


def _run(body: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _COUNTS + body],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def test_the_first_store_import_turns_the_statistics_off() -> None:
    body = """
assert counts()
import ingest.state.sqlite as S
report(S, table(), counts())
"""
    assert _run(body) == "True False x"


def test_an_open_connection_keeps_them_on() -> None:
    body = """
c = table()
import ingest.state.sqlite as S
report(S, c, counts())
"""
    assert _run(body) == "False True x"


def test_a_second_import_with_a_connection_open_leaves_sqlite_alone() -> None:
    # Off, the count no longer moves (0 with connections open): the probe allocation tells.
    body = """
import importlib
import ingest.state.sqlite as S
c = table()
report(importlib.reload(S), c)
"""
    assert _run(body) == "False x"
