"""A pod worker hands the GIL over within SWITCH_INTERVAL_S (`ingest.pod.worker.tune_threads`):
its decode thread asks for the GIL ~20 times a batch and waited up to 5 ms each time."""

from __future__ import annotations

import inspect
import sys

import pytest

from ingest.pod import worker


def test_tune_threads_sets_the_switch_interval() -> None:
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        worker.tune_threads()
        assert sys.getswitchinterval() == pytest.approx(worker.SWITCH_INTERVAL_S)
        assert worker.SWITCH_INTERVAL_S < 0.005  # shorter than CPython's default
    finally:
        sys.setswitchinterval(before)


def test_every_worker_tunes_its_threads_before_it_builds_its_service() -> None:
    source = inspect.getsource(worker.run)
    assert source.index("tune_threads()") < source.index("Service.build(")
