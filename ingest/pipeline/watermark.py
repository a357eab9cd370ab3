"""Commit watermark: batches finish in any order, but a checkpoint may only cover a prefix.

A source position is committed only when every batch read before it is durable, so a crash
never skips a gap. Items are tracked by identity: two equal batches are still two batches.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class CommitTracker(Generic[T]):
    """Batches are added in read order, finish in any order; commit only a contiguous prefix."""

    def __init__(self) -> None:
        self._order: deque[T] = deque()  # added, not yet returned, in read order
        self._done: set[int] = set()  # id() of finished items still in _order
        self._known: set[int] = set()  # id() of every item in _order

    def add(self, item: T) -> None:
        """Register `item` as the next one in read order."""
        key = id(item)
        if key in self._known:
            raise ValueError("item already tracked")
        self._order.append(item)
        self._known.add(key)

    def done(self, item: T) -> list[T]:
        """Mark `item` finished; return the items now committable, in read order, each once."""
        key = id(item)
        if key not in self._known:
            raise ValueError("unknown item: never added or already committed")
        self._done.add(key)
        out: list[T] = []
        while self._order and id(self._order[0]) in self._done:
            head = self._order.popleft()
            self._done.discard(id(head))
            self._known.discard(id(head))
            out.append(head)
        return out

    @property
    def pending(self) -> int:
        """Items added but not yet returned by `done`."""
        return len(self._order)
