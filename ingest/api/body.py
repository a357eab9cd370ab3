"""Reading a request body under a size cap, a total deadline and a minimum rate.

A sender that trickles its body (by accident or to hold connections open) gets a 408 once it
falls behind: the body must be complete within `http.body_timeout_seconds`, and after the
first `http.body_grace_seconds` at least `http.min_body_bytes_per_second` must have arrived on
average. uvicorn has no body timeout of its own (its keep-alive timeout only covers idle
connections), so the webhook handler reads through this.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from starlette.requests import Request


class BodyTooLarge(Exception):
    """More than the limit arrived (or was declared)."""


class BodyTooSlow(Exception):
    """The body fell behind the minimum rate or the total deadline; the message says which."""


async def read_body(
    request: Request,
    *,
    limit: int,
    timeout: float,
    min_rate: float,
    grace: float,
    clock: Callable[[], float] = time.monotonic,
) -> bytes:
    """The whole body, or BodyTooLarge / BodyTooSlow. A client that goes away raises
    starlette's ClientDisconnect (the app logs it in one line)."""
    start = clock()
    body = bytearray()
    stream = request.stream()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    cancelling = task.cancelling()
    expired = False
    timer: asyncio.TimerHandle  # the one pending, set below

    def latest() -> float:
        """The latest moment (loop time) the next bytes may arrive without breaking either
        rule: it only moves later as bytes arrive."""
        by_rate = grace + len(body) / min_rate if min_rate > 0 else math.inf
        return loop.time() + min(timeout, by_rate) - (clock() - start)

    def on_timer() -> None:
        """One timer a body, moved on only when it fires (`asyncio.wait_for` a chunk made a
        task, a future and a timer each: ~55 of the ~63 us a two-chunk body took on Python
        3.11 with uvloop; docs/benchmarks.md, ctlloop2)."""
        nonlocal timer, expired
        when = latest()
        if when > loop.time():
            timer = loop.call_at(when, on_timer)
        else:
            expired = True
            task.cancel()

    timer = loop.call_at(latest(), on_timer)
    try:
        while True:
            if latest() <= loop.time():
                raise BodyTooSlow(_why(len(body), clock() - start, timeout, min_rate, grace))
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                return bytes(body)
            body.extend(chunk)
            if len(body) > limit:
                raise BodyTooLarge(f"body exceeds the limit of {limit} bytes")
    except asyncio.CancelledError:
        if expired and task.uncancel() <= cancelling:  # our timer's, not the caller's
            raise BodyTooSlow(_why(len(body), clock() - start, timeout, min_rate, grace)) from None
        raise
    finally:
        timer.cancel()
        await stream.aclose()


def _why(received: int, elapsed: float, timeout: float, min_rate: float, grace: float) -> str:
    return (
        f"the body arrived too slowly: {received} bytes in {elapsed:.1f} s; a body must be "
        f"complete within {timeout:g} s and arrive at {min_rate:g} bytes/s or more after the "
        f"first {grace:g} s (http.body_timeout_seconds, http.min_body_bytes_per_second)"
    )
