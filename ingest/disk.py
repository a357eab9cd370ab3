"""Free-space watermarks on the data directory: refuse new work before the disk is full.

Embedded mode keeps the webhook intake, the state (DLQ, checkpoints, idempotency keys) and the
SQLite sink on one filesystem. Left alone, accepted webhooks fill it and then the pipeline's
own writes fail: records already acknowledged cannot be written anywhere. So below the low
watermark the webhook intake answers 507 (JSON, with Retry-After) and the space left is a
reserve for the pipeline's writes; intake resumes above the high watermark (hysteresis, so it
does not flap). A write that still finds the disk full is waited out by the pipeline
(`Pipeline.until_ok`), never dead-lettered.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingest.config import DiskConfig
from ingest.metrics import Metrics


@dataclass(slots=True)
class DiskSample:
    free: int
    total: int
    at: float


class DiskGuard:
    """Watches one filesystem (the one holding `path`)."""

    def __init__(
        self,
        path: Path,
        cfg: DiskConfig,
        metrics: Metrics | None = None,
        *,
        guards_intake: bool = True,
        statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.low = cfg.low_watermark_bytes
        self.high = (
            cfg.high_watermark_bytes if cfg.high_watermark_bytes is not None else 2 * self.low
        )
        self.metrics = metrics
        self.guards_intake = guards_intake  # False when intake is not on this disk (Kafka)
        self._statvfs = statvfs
        self._clock = clock
        self.last: DiskSample | None = None
        self.error: str | None = None
        self.refusing = False
        self.refusing_since: float | None = None
        if metrics is not None:
            metrics.disk_low.set(self.low)

    def sample(self) -> DiskSample | None:
        """Read free space now (a statvfs call: microseconds) and update the refusal state."""
        try:
            st = self._statvfs(self.path)
        except OSError as exc:
            self.error = f"cannot read free space of {self.path}: {exc.strerror or exc}"
            return self.last
        self.error = None
        sample = DiskSample(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, self._clock())
        self.last = sample
        if sample.free < self.low and not self.refusing:
            self.refusing, self.refusing_since = True, sample.at
        elif sample.free >= self.high and self.refusing:
            self.refusing, self.refusing_since = False, None
        if self.metrics is not None:
            self.metrics.disk_free.set(sample.free)
        return sample

    def refuse_intake(self, incoming_bytes: int, max_age: float = 0.0) -> str | None:
        """Why a webhook body of this size is refused now, or None to accept it. `max_age`:
        a sample at most this many seconds old is judged again instead of a new statvfs (a
        pod's door asks twice a request; the space used in 50 ms is far below the reserve)."""
        if not self.guards_intake:
            return None
        last = self.last
        fresh = last is not None and 0.0 <= self._clock() - last.at < max_age
        sample = last if fresh else self.sample()
        if sample is None:
            return None
        if self.refusing or sample.free - incoming_bytes < self.low:
            return (
                f"the data disk has {_mb(sample.free)} free, below the {_mb(self.low)} kept for "
                f"records already accepted; new records are accepted again above "
                f"{_mb(self.high)} free"
            )
        return None

    @property
    def low_space(self) -> bool:
        return self.refusing

    def snapshot(self) -> dict[str, Any]:
        s = self.last
        return {
            "path": str(self.path),
            "free_bytes": None if s is None else s.free,
            "total_bytes": None if s is None else s.total,
            "low_watermark_bytes": self.low,
            "high_watermark_bytes": self.high,
            "intake_refused": self.refusing and self.guards_intake,
            "low_since": self.refusing_since,
            "error": self.error,
        }


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
