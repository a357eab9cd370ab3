#!/usr/bin/env bash
# Install and start test servers: `up.sh` (all) or `up.sh postgres redis ...`.
# Writes $INGEST_RUN_DIR/all.env, which sources each server's env file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export INGEST_RUN_DIR="${INGEST_RUN_DIR:-/tmp/ingest-test-run}"
mkdir -p "$INGEST_RUN_DIR"
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(tools postgres redis kafka neo4j typesense seaweedfs sshd)
: > "$INGEST_RUN_DIR/all.env"
for n in "${names[@]}"; do
  echo "== $n: install"
  "$here/$n.sh" install
  echo "== $n: start"
  t0=$(date +%s)
  "$here/$n.sh" start
  echo "== $n: ready in $(( $(date +%s) - t0 ))s"
  echo "source '$INGEST_RUN_DIR/$n.env'" >> "$INGEST_RUN_DIR/all.env"
done
