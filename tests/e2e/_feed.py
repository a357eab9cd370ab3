"""What the e2e tests send and what must result, shared by the crash, fault and Kafka tests.

- `SEED` / `seeded(what)`: the crash tests' random seed (INGEST_CRASH_SEED replays a run),
  printed so a failure can be replayed.
- `revisions(rng)`, `Expected`: the revisions an entity gets and how each record is judged
  (the revision rule: below a revision already seen = OLDER_REVISION in the DLQ; applied but
  overtaken later = superseded). `Feed` (inbox files / webhook requests) and the Kafka feed
  (`tests/e2e/_kafka.py`) build on them.
- `drop_file`: an inbox file written elsewhere and renamed in.
- `Sender`: webhook requests posted from a thread until each gets its 202, as a retrying
  client does across the service's kills and restarts.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from types import TracebackType

import httpx

from tests.conftest import rec
from tests.e2e._auth import sign_headers

TENANT = "acme-corp"
_2025 = 1_735_689_600  # 2025-01-01T00:00:00Z


def occurred_at(i: int) -> str:
    """Record `i`'s event time: 2025-01-01 plus `i` milliseconds. Each record has its own, as
    a real feed's do; one time shared by every record let the decoder's time cache answer
    them all, a path no real feed takes."""
    seconds, ms = divmod(i, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(_2025 + seconds)) + f".{ms:03d}Z"


SEED = int(os.environ.get("INGEST_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))


def seeded(what: str = "crash test") -> random.Random:
    """A random.Random on SEED, printed so a failing run can be replayed."""
    print(f"{what} seed: {SEED} (set INGEST_CRASH_SEED to replay)")
    return random.Random(SEED)


def revisions(rng: random.Random) -> list[int]:
    """An entity's revisions in sending order: 1 (70%), or 3 distinct ones in random order."""
    return [1] if rng.random() < 0.7 else rng.sample(range(1, 9), 3)


class Expected:
    """What must result: `final` (entity -> highest revision in the sink), `valid` (the
    distinct valid records), `dlq_lines` (line -> reason of each record the DLQ must hold,
    one row per distinct line) and `superseded` (applied in feed order, then overtaken by a
    higher revision: a replay after the sink holds the higher one judges them
    OLDER_REVISION)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.final: dict[str, int] = {}
        self.valid: set[str] = set()
        self.dlq_lines: dict[str, str] = {}
        self.superseded: set[str] = set()

    def judge(self, line: str, entity_id: str, revision: int, high: int) -> bool:
        """Record a valid line of `entity_id` sent after revisions up to `high` (and
        `self.final[entity_id]` set already); True when the DLQ must hold it."""
        self.valid.add(line)
        if revision < high:
            self.dlq_lines[line] = "OLDER_REVISION"
            return True
        if revision < self.final[entity_id]:
            self.superseded.add(line)
        return False


class Feed(Expected):
    """Lines grouped per unit (an inbox file or a webhook request), plus what must result
    (`Expected`) and `dlq` (reason -> rows); `keyed` adds the distinct lines that fail
    decoding: together the idempotency keys the feed claims."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.dlq: Counter[str] = Counter()
        self._bad_lines: set[str] = set()

    def unit(self, prefix: str, n_entities: int) -> list[str]:
        lines: list[str] = []
        for e in range(n_entities):
            eid = f"{prefix}-{e}"
            revs = revisions(self.rng)
            self.final[eid] = max(revs)
            high = 0
            for r in revs:
                lines.append(json.dumps(rec(eid, r)))
                if self.judge(lines[-1], eid, r, high):
                    self.dlq["OLDER_REVISION"] += 1
                high = max(high, r)
            roll = self.rng.random()
            if roll < 0.03:
                lines.append(lines[-1])  # exact duplicate: no effect
            elif roll < 0.05:
                drift = json.dumps(rec(f"{eid}-d", 1, attributes={"amount": "1.5"}))
                self._bad(lines, drift, "SCHEMA_DRIFT")
            elif roll < 0.06:
                self._bad(lines, '{"broken": ' + eid, "VALIDATION_FAIL")
        return lines

    def drop_and_post(
        self, inbox: Path, files: tuple[int, int], requests: tuple[int, int]
    ) -> tuple[list[str], int]:
        """The crash tests' feed: `files` = (count, entities each) inbox files dropped into
        `inbox` now, `requests` = (count, entities each) webhook bodies to send. Returns the
        bodies and how many lines both hold."""
        n_lines = 0
        for f in range(files[0]):
            lines = self.unit(f"file{f}", files[1])
            n_lines += len(lines)
            drop_file(inbox, f"orders-{f}.jsonl", lines)
        bodies = []
        for b in range(requests[0]):
            lines = self.unit(f"hook{b}", requests[1])
            n_lines += len(lines)
            bodies.append("\n".join(lines))
        return bodies, n_lines

    @property
    def keyed(self) -> set[str]:
        """The lines the idempotency store keeps a key for: each distinct valid record, and
        each distinct line that failed decoding (keyed by its bytes: a repeat is a duplicate)."""
        return self.valid | self._bad_lines

    def _bad(self, lines: list[str], line: str, reason: str) -> None:
        lines.append(line)
        if line not in self._bad_lines:
            self._bad_lines.add(line)
            self.dlq[reason] += 1
            self.dlq_lines[line] = reason

    def assert_rows(self, rows: dict[str, int]) -> None:
        """The sink holds every entity of the feed at its highest revision, and nothing else."""
        missing = set(self.final) - set(rows)
        assert not missing, f"{len(missing)} entities missing, e.g. {sorted(missing)[:5]}"
        assert rows == self.final


def drop_file(inbox: Path, name: str, lines: list[str]) -> Path:
    """Write elsewhere, rename in: the inbox takes it at once and never half-written."""
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    target = inbox / name
    tmp.rename(target)
    return target


def post_all(url: str, bodies: list[str], stop: threading.Event) -> None:
    """Send each body until it gets a 202, like a client that retries on failure."""
    with httpx.Client(timeout=10) as client:
        for body in bodies:
            while not stop.is_set():
                try:
                    r = client.post(  # signed afresh on every attempt
                        url,
                        content=body,
                        headers=sign_headers(TENANT, body, content_type="application/x-ndjson"),
                    )
                    if r.status_code == 202:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)


class Sender:
    """`post_all` in a daemon thread for the `with` block; leaving it stops the sending."""

    def __init__(self, url: str, bodies: list[str]) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=post_all, args=(url, bodies, self.stop), daemon=True)

    def __enter__(self) -> Sender:
        self.thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop.set()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout=timeout)
        assert self.done(), "webhook sender did not finish"
