"""shutdown.drain_timeout_seconds bounds the drain on SIGTERM (Kubernetes' grace period is
sized from it: deploy/k8s, tests/unit/test_k8s_manifests.py)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from ingest import config as C
from ingest.service import Service


class _Closing:
    async def close(self) -> None:
        return None


def _service(drain: float, task: asyncio.Task[Any]) -> Any:
    return SimpleNamespace(
        config=C.Config.model_validate({"shutdown": {"drain_timeout_seconds": drain}}),
        admission=SimpleNamespace(drain=lambda: None),
        control=SimpleNamespace(freeze=lambda: None),  # the fleet follower stops following
        stopping=asyncio.Event(),
        _tasks=[task],
        sources=[],
        intake=None,
        core=_Closing(),
    )


@pytest.mark.parametrize("drain", [0.2, 0.6])
async def test_a_batch_that_never_finishes_is_cancelled_after_the_drain_timeout(
    drain: float,
) -> None:
    stuck = asyncio.create_task(asyncio.sleep(3600), name="stuck-runner")
    t0 = time.monotonic()
    await Service.shutdown(_service(drain, stuck))
    took = time.monotonic() - t0
    await asyncio.sleep(0)
    assert stuck.cancelled()
    assert drain <= took < drain + 0.5


async def test_work_that_finishes_in_time_is_not_cancelled() -> None:
    quick = asyncio.create_task(asyncio.sleep(0.05))
    await Service.shutdown(_service(5.0, quick))
    assert quick.done() and not quick.cancelled()


def test_the_setting_is_validated() -> None:
    assert C.Config().shutdown.drain_timeout_seconds == 60
    with pytest.raises(ValueError):
        C.Config.model_validate({"shutdown": {"drain_timeout_seconds": 0}})
