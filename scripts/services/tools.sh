#!/usr/bin/env bash
# Command-line tools the runbook's commands and tests use (curl, jq, watch, promtool).
# No server: start/stop do nothing.
set -euo pipefail
case "${1:-}" in
  install)
    missing=()
    for tool in curl jq watch promtool; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
    if [ ${#missing[@]} -gt 0 ]; then
      pkgs=("${missing[@]/watch/procps}")
      pkgs=("${pkgs[@]/promtool/prometheus}")
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
    fi ;;
  start) mkdir -p "${INGEST_RUN_DIR:-/tmp/ingest-test-run}"; : > "${INGEST_RUN_DIR:-/tmp/ingest-test-run}/tools.env" ;;
  stop) ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
