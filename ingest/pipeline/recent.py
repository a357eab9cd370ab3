"""The keys a worker claimed, batch by batch (`ClaimLog`): a prefetched idempotency lookup
(`Pipeline.prefetch_seen`) is completed from the claims made since it was sent.

A lookup takes the log's `mark` just before it is sent; every claim that completed before
the mark is in the store's answer, every one after it is in `since(mark)`. So the check is
exact and asks only the few batches claimed meanwhile (one, as a source's runner decodes one
batch ahead): a set of ~one batch's keys, built once a batch. The two generations of
100,000-key sets this replaced took each key in (`set.update`), probed two sets of up to
twice that for each key checked, and freed a generation every 100,000 keys: ~110 ns a key
against ~45 (`docs/benchmarks.md`, lines' section). The check itself (`may_meet`) is
compiled: a set of the claimed batch's keys and `isdisjoint` hashed each key of both batches
with SipHash on the event loop, ~145 ns a key; the digests' first 8 bytes are a hash already.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import islice

from ingest import native

NOTHING: frozenset[bytes] = frozenset()
_MAY_MEET = native.function("keys_may_meet")


def may_meet(claimed: Sequence[bytes], keys: Sequence[bytes]) -> bool:
    """False when no key of `claimed` is among `keys`; True when one is, or (compiled, two
    lists of bytes) may be: two keys share their first 8 bytes. Then check exactly."""
    if _MAY_MEET is not None and type(claimed) is list and type(keys) is list:
        return bool(_MAY_MEET(claimed, keys))
    return not set(claimed).isdisjoint(keys)


class ClaimLog:
    """The newest claimed batches' keys, at least `keep` keys of them (whole batches)."""

    __slots__ = ("_batches", "_first", "_held", "_keep")

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self._keep = keep
        self._batches: deque[Sequence[bytes]] = deque()
        self._first = 0  # the number of the oldest batch held (batches are numbered from 0)
        self._held = 0  # keys in the batches held

    def mark(self) -> int:
        """The number the next claimed batch gets: take it before the lookup is sent."""
        return self._first + len(self._batches)

    def add(self, keys: Sequence[bytes]) -> None:
        """A claimed batch's keys, once the claim completed (the list is kept, not copied:
        its owner must not change it)."""
        if not keys:
            return
        batches = self._batches
        batches.append(keys)
        self._held += len(keys)
        while self._held - len(batches[0]) >= self._keep:
            self._held -= len(batches.popleft())
            self._first += 1

    def batches(self, mark: int) -> list[Sequence[bytes]] | None:
        """The batches claimed from batch `mark` on (as `add` took them); None when the log
        no longer holds all of them (then look up again, with a new mark)."""
        start = mark - self._first
        if start < 0:
            return None
        return list(islice(self._batches, start, None))

    def since(self, mark: int) -> frozenset[bytes] | set[bytes] | None:
        """The keys claimed from batch `mark` on, as a set; None as `batches`."""
        batches = self.batches(mark)
        return None if batches is None else union(batches)

    def __len__(self) -> int:
        """Keys held."""
        return self._held


def union(batches: Sequence[Sequence[bytes]]) -> frozenset[bytes] | set[bytes]:
    """The keys of `batches` (`ClaimLog.batches`) as one set."""
    if not batches:
        return NOTHING
    if len(batches) == 1:
        return set(batches[0])
    return set().union(*batches)
