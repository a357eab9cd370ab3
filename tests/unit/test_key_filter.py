"""The idempotency store's in-memory key filter (`KeyFilter`): the compiled Bloom steps
(ingest_native's `bloom_block_add` / `bloom_block_maybe`) set and read exactly the bits of
the Python loops they replace, and neither ever rules out a key it was given."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.state import sqlite_idem as state_sqlite
from ingest.state.sqlite_idem import KeyFilter, _Bloom

native = pytest.importorskip("ingest_native", reason="the compiled extension is not built")

keys = st.binary(min_size=32, max_size=32)
blobs = st.lists(st.lists(keys, max_size=40).map(b"".join), min_size=1, max_size=4)


def _python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_sqlite, "_BLOOM_ADD", None)
    monkeypatch.setattr(state_sqlite, "_BLOOM_MAYBE", None)


def _filled(added: list[bytes]) -> KeyFilter:
    flt = KeyFilter()
    for i, blob in enumerate(added):
        flt.add(blob, float(i))
    return flt


@settings(max_examples=60, deadline=None)
@given(added=blobs, asked=st.lists(keys, max_size=60).map(b"".join))
def test_compiled_and_python_filters_agree(added: list[bytes], asked: bytes) -> None:
    """Property: the same keys added give the same bits, the same `maybe` answers, and every
    added key is a maybe (no false negative), compiled or not."""
    assert state_sqlite._BLOOM_ADD is native.bloom_block_add  # the compiled path is the one in use
    compiled = _filled(added)
    with pytest.MonkeyPatch.context() as mp:
        _python(mp)
        python = _filled(added)
        python_maybe = python.maybe(asked)
        python_added = [python.maybe(blob) for blob in added]
    assert [b.bits for b in compiled._blooms] == [b.bits for b in python._blooms]
    assert len(compiled) == len(python)
    assert compiled.maybe(asked) == python_maybe
    for blob, found in zip(added, python_added, strict=True):
        assert found == list(range(len(blob) // 32))
        assert compiled.maybe(blob) == found


def test_compiled_filter_over_several_blooms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `_Bloom.KEYS` keys a second filter starts: `maybe` asks both (a key of either is
    found, sorted, once)."""
    monkeypatch.setattr(_Bloom, "KEYS", 4)
    first, second = bytes(range(32)) * 3, bytes(range(1, 33)) * 3
    flt = KeyFilter()
    flt.add(first, 1.0)
    flt.add(second, 2.0)
    assert len(flt._blooms) == 2
    assert flt.maybe(second + first) == [0, 1, 2, 3, 4, 5]


def test_compiled_steps_refuse_a_short_key_or_foreign_bits() -> None:
    with pytest.raises(ValueError):
        native.bloom_block_add(bytearray(_Bloom.BITS >> 3), b"x" * 31)
    with pytest.raises(ValueError):
        native.bloom_block_maybe(bytearray(16), b"x" * 32)


def test_eight_positions_a_key_keep_a_full_filter_rare_in_false_positives() -> None:
    """A full filter (`_Bloom.KEYS` keys, 32 bits a key) lets ~0.0016 % of unknown keys
    through with eight positions a key in one 512-bit block (~6 of 400,000 here; ~0.0005 %
    with the eight anywhere in the filter, which cost eight cache misses a key); 16 bits a
    key let ~0.06 % through
    (~240), four positions at 16 bits ~0.24 % (~960). Each is probed in its filter's runs, one
    a merge (~160 a full filter), which made `seen` dearer as the store grew."""
    import random

    rng = random.Random(12)
    flt = KeyFilter()
    added = rng.randbytes(32 * _Bloom.KEYS)
    flt.add(added, 1.0)
    assert len(flt._blooms) == 1
    assert flt.maybe(added[:32_000]) == list(range(1_000))
    del added
    wrong = flt.maybe(rng.randbytes(32 * 400_000))
    assert len(wrong) < 24


def test_four_positions_a_key_keep_false_positives_rare() -> None:
    """Every key `maybe` wrongly lets through is probed in `idem_mid` and every live run, so
    the false-positive rate is what a lookup costs as runs pile up. 1M keys in one filter
    (64 bits a key): two positions a key let ~0.1 % of unknown keys through (~190 of
    200,000), four ~0.0014 % (~3), eight fewer still."""
    import hashlib

    def digests(start: int, n: int) -> bytes:
        return b"".join(
            hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(start, start + n)
        )

    flt = KeyFilter()
    added = digests(0, 1_000_000)
    flt.add(added, 1.0)
    assert flt.maybe(added[:32_000]) == list(range(1_000))
    wrong = flt.maybe(digests(10_000_000, 200_000))
    assert len(wrong) < 40
