"""The idempotency store's key blob: 32-byte keys joined, any other length refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.state.sqlite_idem import _key_blob

keys = st.lists(st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40)), max_size=20)


@given(keys)
def test_key_blob_joins_32_byte_keys_and_refuses_any_other(ks: list[bytes]) -> None:
    if all(len(k) == 32 for k in ks):
        assert _key_blob(ks) == b"".join(ks)
    else:
        with pytest.raises(ValueError):
            _key_blob(ks)


def test_key_blob_of_no_keys_is_empty() -> None:
    assert _key_blob([]) == b""
