"""Generate deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/alerts.yml, so the
alerts Kubernetes' Prometheus Operator loads are the ones promtool tests:

    uv run python -m ingest.tools.prometheus_rule > deploy/k8s/base/prometheusrule.yaml
(tests/unit/test_k8s_manifests.py fails when the checked-in file differs from this output.)
The rule groups are copied as text (comments and layout kept), indented under `spec:`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml: edit that file, then run
#   uv run python -m ingest.tools.prometheus_rule > deploy/k8s/base/prometheusrule.yaml
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: ingest
  labels: {release: prometheus}
spec:
"""


def render(alerts: str) -> str:
    """The PrometheusRule for an alerts.yml text: everything from its `groups:` line on."""
    lines = alerts.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("groups:")), None)
    if start is None:
        raise ValueError("alerts.yml has no top-level `groups:`")
    body = [("  " + line).rstrip() for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main() -> None:
    sys.stdout.write(render(ALERTS.read_text()))


if __name__ == "__main__":
    main()
