"""Embedded mode keeps the per-process control state it always had: an `/admin` action holds
in the process that was asked and a restart starts `normal` (no fleet to share it with, and a
paused laptop service must not come back paused from an old state.db)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.config import Config
from ingest.factory import build_core
from ingest.pipeline.admission import BackpressureState


@pytest.mark.parametrize("action", ["drain", "pause", "brownout"])
async def test_embedded_control_is_per_process(tmp_path: Path, action: str) -> None:
    cfg = Config.model_validate({"data_dir": str(tmp_path)})
    first = await build_core(cfg)
    try:
        await first.control.sync()
        rec = await first.control.submit(action, rate=0.5 if action == "brownout" else None,
                                         who="op")
        assert rec.version == 1 and first.admission.state.value == rec.state
        assert first.control.snapshot()["store"] == "memory"
    finally:
        await first.stores.close()
    again = await build_core(cfg)  # the same data dir, as after a restart
    try:
        await again.control.sync()
        assert again.admission.state is BackpressureState.NORMAL
        assert again.control.applied.version == 0
    finally:
        await again.stores.close()
