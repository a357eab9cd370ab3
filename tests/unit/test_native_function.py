"""ingest.native.function: a compiled helper, or None where its Python twin must run."""

from __future__ import annotations

import pytest

import ingest_native
from ingest import native


def test_a_helper_the_extension_has_is_returned() -> None:
    assert native.function("flock_wait") is ingest_native.flock_wait


def test_a_helper_an_older_extension_lacks_is_none() -> None:
    assert native.function("no_such_helper") is None


def test_no_helper_with_the_extension_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGEST_NO_EXTENSION", "1")
    assert native.function("flock_wait") is None
