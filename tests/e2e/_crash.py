"""The kill -9 loop the crash tests share: start the service, SIGKILL it at random moments
and start it again on the same data, then wait until everything fed has been taken in."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from tests.e2e._feed import TENANT, Sender
from tests.e2e._service import ServiceProcess, finished


def wait_finished(svc: ServiceProcess, inbox: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not finished(svc, inbox):
        assert time.monotonic() < deadline, f"not finished: {svc.health()}"
        time.sleep(0.3)


class Crashes:
    """The service of a kill -9 test across its restarts: `svc` is the one running now and
    is stopped when the `with` block ends, however it ends."""

    def __init__(self, start: Callable[[], ServiceProcess]) -> None:
        self.start = start
        self.svc = start()
        self.kills = 0

    def __enter__(self) -> Crashes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.svc.stop()

    def kill9_at_random(
        self,
        rng: random.Random,
        rounds: int,
        pause: tuple[float, float],
        done: Callable[[ServiceProcess], bool],
    ) -> None:
        """Up to `rounds` times: wait a random while, then SIGKILL and restart the service,
        unless it is `done` already."""
        for _ in range(rounds):
            time.sleep(rng.uniform(*pause))
            if done(self.svc):
                return
            self.svc.kill9()
            self.kills += 1
            self.svc = self.start()


def kill9_while_sending(
    start: Callable[[], ServiceProcess],
    inbox: Path,
    bodies: list[str],
    rng: random.Random,
    *,
    pause: tuple[float, float],
    timeout: float,
    rounds: int = 6,
) -> int:
    """Up to `rounds` kills while `bodies` are posted as webhooks of TENANT (each resent until
    it gets a 202); then everything sent and the inbox taken in, and a clean SIGTERM exit.
    Returns how many kills there were."""
    with Crashes(start) as run:
        with Sender(f"{run.svc.url}/v1/webhooks/{TENANT}/shop", bodies) as sender:
            run.kill9_at_random(
                rng, rounds, pause, lambda svc: finished(svc, inbox) and sender.done()
            )
            sender.join(timeout=timeout)
        wait_finished(run.svc, inbox, timeout)
        assert run.svc.terminate() == 0
    return run.kills
