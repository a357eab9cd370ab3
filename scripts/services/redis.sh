#!/usr/bin/env bash
# Redis for tests: no persistence, 127.0.0.1 only.  install | start | stop | restart-server
# `restart-server` stops and starts the same server (data is lost: no persistence), which is
# what the "Redis restarted mid-run" test needs.
# ports: INGEST_TEST_REDIS_PORT
set -euo pipefail
. "$(dirname "$0")/lib.sh"
RUN="${INGEST_RUN_DIR:-/tmp/ingest-test-run}"
PORT="${INGEST_TEST_REDIS_PORT:-16379}"
DIR="$RUN/redis"
PIDFILE="$DIR/redis.pid"

install() {
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt_install redis-server redis-tools
  fi
}

# alive and not a zombie (a daemonized server's parent may be a PID 1 that reaps slowly)
alive() { kill -0 "$1" 2>/dev/null && ! grep -qE '^[0-9]+ \(.*\) Z' "/proc/$1/stat" 2>/dev/null; }
running() { [ -f "$PIDFILE" ] && alive "$(cat "$PIDFILE")"; }

start_server() {
  running && return 0
  mkdir -p "$DIR"
  redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$PIDFILE" --dir "$DIR" --logfile "$DIR/redis.log"
  local deadline=$((SECONDS + READY_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG && return 0
    [ -f "$PIDFILE" ] && ! running && break  # it died
    sleep 0.05
  done
  echo "redis did not become ready; see $DIR/redis.log" >&2; return 1
}

stop_server() {
  running || return 0
  local pid; pid="$(cat "$PIDFILE")"
  kill "$pid"
  for _ in $(seq 1 100); do alive "$pid" || return 0; sleep 0.05; done
  kill -9 "$pid" 2>/dev/null || true
}

start() {
  stop_server
  rm -rf "$DIR"
  start_server
  cat > "$RUN/redis.env" <<ENV
export INGEST_TEST_REDIS_URL='redis://127.0.0.1:$PORT/0'
export INGEST_TEST_REDIS_PIDFILE='$PIDFILE'
ENV
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop_server ;;
  restart-server) stop_server; start_server ;;
  *) echo "usage: $0 install|start|stop|restart-server" >&2; exit 2 ;;
esac
