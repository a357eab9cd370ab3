"""`ingest.api.body.read_body`: one timer a body, moved on only when it fires. The deadline
for the next bytes only moves later as bytes arrive, so the timer is re-armed at the deadline
of the bytes read by then, and a body is refused only when that deadline has passed; a
cancellation that is not the timer's stays a cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from starlette.requests import Request

from ingest.api.body import BodyTooLarge, BodyTooSlow, read_body


def _request(chunks: Sequence[tuple[float, bytes]]) -> Request:
    """A request whose body arrives as (delay before it, bytes) chunks."""
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        if not pending:
            await asyncio.sleep(3600)  # nothing more: a sender that went quiet
        delay, data = pending.pop(0)
        await asyncio.sleep(delay)
        return {"type": "http.request", "body": data, "more_body": bool(pending)}

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


async def _read(chunks: Sequence[tuple[float, bytes]], **kw: float) -> bytes:
    args = {"limit": 1 << 20, "timeout": 5.0, "min_rate": 1000.0, "grace": 0.2} | kw
    return await asyncio.wait_for(read_body(_request(chunks), **args), 10)  # type: ignore[arg-type]


async def test_a_body_in_time_is_read_whole() -> None:
    assert await _read([(0, b"ab"), (0, b""), (0, b"cd")]) == b"abcd"


async def test_the_deadline_moves_on_with_the_bytes_read() -> None:
    # 0.2 s of grace, then 1,000 bytes/s: 400 bytes at once earn 0.4 s more, so the second
    # chunk at ~0.35 s is in time although the first deadline (0.2 s) has passed
    body = await _read([(0, b"x" * 400), (0.35, b"y")])
    assert body == b"x" * 400 + b"y"


async def test_a_body_that_falls_behind_is_too_slow() -> None:
    with pytest.raises(BodyTooSlow, match="400 bytes"):
        await _read([(0, b"x" * 400), (0.9, b"y")])  # due by ~0.6 s


async def test_a_sender_that_goes_quiet_is_too_slow_at_the_total_deadline() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(BodyTooSlow, match="0 bytes"):
        await _read([], timeout=0.3, grace=10.0)
    assert 0.25 < loop.time() - start < 2


async def test_too_large_is_too_large() -> None:
    with pytest.raises(BodyTooLarge):
        await _read([(0, b"x" * 10)], limit=5)


async def test_a_cancellation_that_is_not_the_timers_stays_a_cancellation() -> None:
    task = asyncio.ensure_future(_read([(0, b"x"), (5, b"y")], grace=10.0))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_timeout_leaves_no_cancellation_pending() -> None:
    with pytest.raises(BodyTooSlow):  # in this task, not wait_for's: its count is looked at
        await read_body(_request([]), limit=10, timeout=0.1, min_rate=1.0, grace=1.0)
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0
    await asyncio.sleep(0)  # would raise CancelledError had the timer's cancel stayed
