"""Every process that runs the pipeline hands the GIL over within SWITCH_INTERVAL_S
(`ingest.service.tune_threads`): its decode thread asks for the GIL ~20 times a batch and
waited up to 5 ms each time. A pod's workers do it; so does a one-worker service; a pod's
control plane does not (its threads are not on the record path)."""

from __future__ import annotations

import inspect
import sys

import pytest

from ingest import service
from ingest.pod import worker


def test_tune_threads_sets_the_switch_interval() -> None:
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        service.tune_threads()
        assert sys.getswitchinterval() == pytest.approx(service.SWITCH_INTERVAL_S)
        assert service.SWITCH_INTERVAL_S < 0.005  # shorter than CPython's default
    finally:
        sys.setswitchinterval(before)


def test_every_worker_tunes_its_threads_before_it_builds_its_service() -> None:
    source = inspect.getsource(worker.run)
    assert source.index("tune_threads()") < source.index("Service.build(")


def test_a_one_worker_service_tunes_its_threads_and_a_control_plane_does_not() -> None:
    source = inspect.getsource(service.serve)
    tuned = source.index("tune_threads()")
    guard = source.rindex("if count <= 1:", 0, tuned)
    assert source[guard:tuned].count("\n") == 1  # the call is the guard's body
    assert tuned < source.index("Service.build(")
