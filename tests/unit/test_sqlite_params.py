"""`ingest.sqlite_params`: bytes and None reach SQLite unchanged (a BLOB of the same bytes, a
NULL) through the adapters every store's import registers, for executemany as for execute."""

from __future__ import annotations

import sqlite3

from hypothesis import given
from hypothesis import strategies as st

import ingest.sinks.sqlite
import ingest.state.sqlite  # noqa: F401


def test_a_store_import_registers_the_adapters() -> None:
    for kind in (bytes, type(None)):
        assert (kind, sqlite3.PrepareProtocol) in sqlite3.adapters


@given(st.lists(st.one_of(st.binary(max_size=64), st.none()), min_size=1, max_size=20))
def test_bytes_and_none_are_stored_as_sent(values: list[bytes | None]) -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v)")
    db.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(values)))
    db.execute("INSERT INTO t VALUES (?, ?)", (len(values), values[0]))
    rows = db.execute("SELECT v, typeof(v) FROM t ORDER BY i").fetchall()
    assert [v for v, _ in rows] == [*values, values[0]]
    kinds = {bytes: "blob", type(None): "null"}
    assert [k for _, k in rows] == [kinds[type(v)] for v in [*values, values[0]]]


def test_a_bytes_subclass_still_binds_as_a_blob() -> None:
    class Key(bytes):
        pass

    db = sqlite3.connect(":memory:")
    ((v, kind),) = db.execute("SELECT ?, typeof(?)", (Key(b"ab"), Key(b"ab"))).fetchall()
    assert (v, kind) == (b"ab", "blob")
