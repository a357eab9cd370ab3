"""Keys claimed lately, kept in memory: at least the newest `keep` of them, at most about
twice that (`Pipeline` completes a prefetched idempotency lookup from these).

Two generations of sets rather than one insertion-ordered dict trimmed from its front: adding
is one C-level `set.update` and forgetting is dropping the older set, where trimming a dict
was a Python loop of deletions per batch that also walked over the slots deleted before.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable


class RecentKeys:
    """A key is kept until at least `keep` distinct keys were added after it (a key added
    again counts from its last addition); nothing that was never added is ever found."""

    __slots__ = ("_keep", "_new", "_old")

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self._keep = keep
        self._new: set[bytes] = set()  # added since the last turn, fewer than `keep`
        self._old: set[bytes] = set()  # the generation before: at least `keep` keys

    def add(self, keys: Iterable[bytes]) -> None:
        new = self._new
        new.update(keys)
        if len(new) >= self._keep:
            self._old = new
            self._new = set()

    def __contains__(self, key: object) -> bool:
        return key in self._new or key in self._old

    def isdisjoint(self, keys: Collection[bytes]) -> bool:
        """True when none of `keys` is kept."""
        return self._new.isdisjoint(keys) and self._old.isdisjoint(keys)

    def __len__(self) -> int:
        """Keys held (a key in both generations counts twice)."""
        return len(self._new) + len(self._old)
