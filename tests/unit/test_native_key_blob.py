"""ingest_native.key_blob, the idempotency store's blob of a batch's keys: the keys joined when
every one is a 32-byte bytes object, else ValueError, as `sqlite_idem._key_blob`'s Python
lines answer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ingest_native

digests = st.binary(min_size=32, max_size=32)
others = st.one_of(
    st.sampled_from([0, 1, 31, 33, 64]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    st.just("x" * 32),
    st.just(bytearray(32)),
)


def python_blob(keys: list[object]) -> bytes:
    if not all(type(k) is bytes and len(k) == 32 for k in keys):
        raise ValueError("idempotency keys are 32-byte digests")
    return b"".join(keys)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.lists(digests, max_size=50), st.one_of(st.none(), others), st.data())
def test_key_blob_is_the_join_of_32_byte_keys_or_refuses(
    keys: list[bytes], bad: object, data: st.DataObject
) -> None:
    items: list[object] = list(keys)
    if bad is not None:
        items.insert(data.draw(st.integers(0, len(items))), bad)
    try:
        wanted: bytes | None = python_blob(items)
    except ValueError:
        wanted = None
    if wanted is None:
        with pytest.raises(ValueError):
            ingest_native.key_blob(items)
    else:
        assert ingest_native.key_blob(items) == wanted
