"""What a source's runner and supervisor report about it, for stall detection and health.

The runner counts records read and committed; the supervisor counts restarts. `stalled` is
judged from these and the adapter's own view (lag, status): a source is stalled when it has
work pending (records read but not committed, or the adapter reports lag or an error) and
nothing was committed for `stall_after` seconds, while the service is not paused or draining
(held work is not stalled work).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class SourceProgress:
    clock: Callable[[], float] = time.time
    pending: int = 0  # records read and not yet committed
    read_total: int = 0
    committed_total: int = 0
    last_commit_at: float | None = None
    moved_at: float = field(default=0.0)  # last commit, or last moment with nothing pending
    restarts: int = 0
    restarting: bool = False  # waiting out the backoff before the next restart
    last_restart_at: float | None = None
    last_restart_error: str | None = None
    stalled_since: float | None = None

    def __post_init__(self) -> None:
        self.moved_at = self.clock()

    def read(self, n: int) -> None:
        if self.pending == 0:
            self.moved_at = self.clock()  # work starts now: the stall clock starts here
        self.pending += n
        self.read_total += n

    def committed(self, n: int) -> None:
        self.pending = max(0, self.pending - n)
        self.committed_total += n
        self.last_commit_at = self.moved_at = self.clock()

    def forget_uncommitted(self) -> None:
        """A restarted runner reads its uncommitted records again: they are no longer held."""
        self.pending = 0

    def restarted(self, error: BaseException) -> None:
        self.restarts += 1
        self.restarting = True
        self.last_restart_at = self.clock()
        self.last_restart_error = f"{type(error).__name__}: {error}"[:500]

    def running(self) -> None:
        self.restarting = False

    def judge(self, *, has_work: bool, held: bool, stall_after: float) -> bool:
        """Update and return `stalled`. `has_work`: the adapter reports lag or an error;
        `held`: the service is paused or draining (not a stall)."""
        now = self.clock()
        if held or not (has_work or self.pending or self.restarting):
            self.moved_at = now  # nothing to move (or not allowed to): the clock restarts
            self.stalled_since = None
            return False
        if now - self.moved_at >= stall_after:
            if self.stalled_since is None:
                self.stalled_since = now
            return True
        self.stalled_since = None
        return False

    def as_dict(self) -> dict[str, Any]:
        return {
            "pending_records": self.pending,
            "last_commit_at": self.last_commit_at,
            "seconds_since_progress": round(max(0.0, self.clock() - self.moved_at), 1),
            "restarts": self.restarts,
            "last_restart_at": self.last_restart_at,
            "last_restart_error": self.last_restart_error,
        }
