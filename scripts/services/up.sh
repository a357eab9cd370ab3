#!/usr/bin/env bash
# Install and start test servers: `up.sh` (all) or `up.sh postgres redis ...`;
# `--no-install` skips the install steps (make test has run them already).
#
# Ports: each script names its port variables on a `# ports:` line (NAME:N = N consecutive
# ports from NAME). Every one not set in the environment gets a free port for this run, so
# two runs on one machine never collide; a set one (e.g. from /tmp/ports/<slug>.env) is kept.
# The servers install and start in parallel (each in its own dir, on its own ports); each
# one's output is in $INGEST_RUN_DIR/<name>.install.log and <name>.up.log.
#
# Writes $INGEST_RUN_DIR/all.env (INGEST_RUN_DIR, then the env file of each server started in
# this run dir, ports included): `source` it before running tests by hand. The exact line is
# printed at the end.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib.sh"
export INGEST_RUN_DIR="${INGEST_RUN_DIR:-/tmp/ingest-test-run}"
mkdir -p "$INGEST_RUN_DIR"
chmod 755 "$INGEST_RUN_DIR"  # servers that run as their own OS user (postgres) look inside
install=1
if [ "${1:-}" = --no-install ]; then install=0; shift; fi
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(tools postgres redis kafka neo4j typesense seaweedfs sshd)

# Installs in parallel too (mostly downloads: Maven Central, PyPI); apt_install takes turns.
if [ "$install" = 1 ]; then
  t0=$(date +%s)
  pids=()
  for n in "${names[@]}"; do
    ( if "$here/$n.sh" install >"$INGEST_RUN_DIR/$n.install.log" 2>&1; then
        echo "== $n: installed ($(( $(date +%s) - t0 ))s)"
      else
        echo "== $n: install FAILED; $INGEST_RUN_DIR/$n.install.log:" >&2
        tail -n 40 "$INGEST_RUN_DIR/$n.install.log" >&2
        exit 1
      fi ) &
    pids+=($!)
  done
  failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  [ "$failed" = 0 ] || { echo "up.sh: an install failed" >&2; exit 1; }
fi

# Free ports for every unset port variable, chosen together (all distinct).
want=() counts=()
for n in "${names[@]}"; do
  for spec in $(sed -n 's/^# ports://p' "$here/$n.sh"); do
    var="${spec%%:*}"; count=1
    [[ "$spec" == *:* ]] && count="${spec#*:}"
    [ -n "${!var:-}" ] || { want+=("$var"); counts+=("$count"); }
  done
done
if [ ${#want[@]} -gt 0 ]; then
  mapfile -t got < <(free_ports "${counts[@]}")
  [ ${#got[@]} -eq ${#want[@]} ] || { echo "up.sh: could not find free ports" >&2; exit 1; }
  for i in "${!want[@]}"; do export "${want[$i]}=${got[$i]}"; done
fi

env_file="$INGEST_RUN_DIR/all.env"
t0=$(date +%s)
pids=()
for n in "${names[@]}"; do
  ( s=$(date +%s)
    if "$here/$n.sh" start >"$INGEST_RUN_DIR/$n.up.log" 2>&1; then
      # the server's ports go with its env, so restarts from a test reuse them
      for spec in $(sed -n 's/^# ports://p' "$here/$n.sh"); do
        var="${spec%%:*}"; echo "export $var=${!var}" >> "$INGEST_RUN_DIR/$n.env"
      done
      echo "== $n: ready in $(( $(date +%s) - s ))s"
    else
      echo "== $n: FAILED to start; $INGEST_RUN_DIR/$n.up.log:" >&2
      tail -n 40 "$INGEST_RUN_DIR/$n.up.log" >&2
      exit 1
    fi ) &
  pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
if [ "$failed" = 1 ]; then
  echo "up.sh: a server failed to start; stopping the others" >&2
  "$here/down.sh" "${names[@]}" >/dev/null 2>&1 || true
  exit 1
fi
# all.env: this run's servers plus those an earlier up.sh started in the same run dir.
{
  echo "export INGEST_RUN_DIR='$INGEST_RUN_DIR'"
  { [ -f "$env_file" ] && grep "^source " "$env_file" || true
    for n in "${names[@]}"; do echo "source '$INGEST_RUN_DIR/$n.env'"; done
  } | awk '!seen[$0]++'
} > "$env_file.tmp"
mv "$env_file.tmp" "$env_file"
echo "== all ${#names[@]} up in $(( $(date +%s) - t0 ))s; for tests by hand:"
echo "source '$env_file'"
