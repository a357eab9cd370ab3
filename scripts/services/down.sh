#!/usr/bin/env bash
# Stop test servers started by up.sh (all of them with no argument).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export INGEST_RUN_DIR="${INGEST_RUN_DIR:-/tmp/ingest-test-run}"
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(sshd seaweedfs typesense neo4j kafka redis postgres)
for n in "${names[@]}"; do
  [ -x "$here/$n.sh" ] && "$here/$n.sh" stop || true
done
