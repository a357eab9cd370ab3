"""librdkafka's own log lines, through Python logging, each distinct one once per window.

While a broker is down librdkafka reports every reconnect attempt: about 20 lines a second
per client, written straight to stderr by default, where they bypass the log format (and the
JSON log option) and bury everything else. Every client we create passes `client_logger()` as
its `logger`, and the source's error callback uses `Repeats` too: a message seen again within
`every` seconds (its digits aside: ports, millisecond timings) is counted, not written, and
the next line written says how many were held back.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

REPEAT_S = 30.0  # the same message is written at most once in this long
_DIGITS = re.compile(r"\d+")
_MAX_KEYS = 200  # distinct messages remembered: bounded memory however varied they are


class Repeats:
    """Decides which messages get written: the first of each kind per window."""

    def __init__(self, every: float = REPEAT_S, clock: Callable[[], float] = time.monotonic):
        self._every = every
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # kind -> (written at, held back since)

    def admit(self, message: str) -> str | None:
        """`message` (with the count held back since it was last written) or None."""
        now, kind = self._clock(), _DIGITS.sub("#", message)
        seen = self._seen.get(kind)
        if seen is not None and now - seen[0] < self._every:
            self._seen[kind] = (seen[0], seen[1] + 1)
            return None
        if len(self._seen) >= _MAX_KEYS:
            self._seen.clear()
        self._seen[kind] = (now, 0)
        if seen is None or not seen[1]:
            return message
        return f"{message} (and {seen[1]} more in the last {now - seen[0]:.0f} s)"


class _RepeatFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.repeats = Repeats()

    def filter(self, record: logging.LogRecord) -> bool:
        text = self.repeats.admit(record.getMessage())
        if text is None:
            return False
        record.msg, record.args = text, None
        return True


def client_logger(client: str) -> logging.Logger:
    """The logger to hand a librdkafka client as `logger` (one per client name)."""
    logger = logging.getLogger(f"ingest.librdkafka.{client}")
    if not any(isinstance(f, _RepeatFilter) for f in logger.filters):
        logger.addFilter(_RepeatFilter())
    return logger
