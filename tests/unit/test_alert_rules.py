"""The runbook's alerts exist and fire as documented (promtool, from Debian's prometheus)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"
RUNBOOK_ALERTS = {"IngestLagHigh", "IngestLagCritical", "IngestDLQRateHigh", "IngestDLQSpike",
                  "IngestBackpressureStuck", "IngestCircuitBreakerOpen"}
OUR_ALERTS = {"IngestReplayRTOAtRisk"}  # the runbook's "Replay within RTO" SLO


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: `scripts/services/tools.sh install` installs it",
                    pytrace=False)
    return path


HEALTH_ALERTS = {"IngestSourceStalled", "IngestSourceRestarting", "IngestSinkUnreachable",
                 "IngestDiskLow", "IngestDiskFull"}


def test_every_runbook_alert_is_defined() -> None:
    names = set(re.findall(r"alert: (\w+)", (RULES / "alerts.yml").read_text()))
    assert names == RUNBOOK_ALERTS | OUR_ALERTS | HEALTH_ALERTS


def test_every_alert_has_a_promtool_test() -> None:
    tested = set(re.findall(r"alertname: (\w+)", (RULES / "alerts_test.yml").read_text()))
    assert tested == RUNBOOK_ALERTS | OUR_ALERTS | HEALTH_ALERTS


def test_rules_are_valid_and_fire_as_tested() -> None:
    check = subprocess.run([promtool(), "check", "rules", "alerts.yml"], cwd=RULES,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=RULES,
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
