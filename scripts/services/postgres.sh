#!/usr/bin/env bash
# PostgreSQL for tests: a private cluster under $INGEST_RUN_DIR/postgres on 127.0.0.1.
#   install | start (fresh data dir) | stop | stop-server / start-server (keep the data dir)
# Runs as the `postgres` OS user (initdb refuses root). fsync and synchronous_commit stay at
# their defaults because the tests check durability.
# ports: INGEST_TEST_PG_PORT
set -euo pipefail
. "$(dirname "$0")/lib.sh"
RUN="${INGEST_RUN_DIR:-/tmp/ingest-test-run}"
PORT="${INGEST_TEST_PG_PORT:-15432}"
DIR="$RUN/postgres"
DATA="$DIR/data"
PASSWORD="ingest-test"
URL="postgresql://ingest:$PASSWORD@127.0.0.1:$PORT/ingest"

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

install() {
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v psql >/dev/null; then
    apt_install postgresql postgresql-client
  fi
}

running() { [ -f "$DATA/postmaster.pid" ] && kill -0 "$(head -1 "$DATA/postmaster.pid")" 2>/dev/null; }

start_server() {
  local bin; bin="$(pg_bin)"
  running && return 0
  as_pg "$bin/pg_ctl" -D "$DATA" -l "$DIR/postgres.log" -w -t "$READY_TIMEOUT" start >/dev/null
  local deadline=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$deadline" ]; do
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$PORT" && return 0
    sleep 0.1
  done
  echo "postgres did not become ready; see $DIR/postgres.log" >&2; return 1
}

stop_server() {
  running || return 0
  as_pg "$(pg_bin)/pg_ctl" -D "$DATA" -m fast -w -t 30 stop >/dev/null
}

start() {
  local bin; bin="$(pg_bin)"
  [ -n "$bin" ] || { echo "postgres not installed: run $0 install" >&2; return 1; }
  stop_server || true
  rm -rf "$DIR"; mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR"
  as_pg "$bin/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null 2>&1 \
    || as_pg "$bin/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C >/dev/null
  cat >> "$DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
shared_buffers = 256MB
max_connections = 200
CONF
  start_server
  as_pg "$bin/psql" -q -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE ingest LOGIN PASSWORD '$PASSWORD'" -c "CREATE DATABASE ingest OWNER ingest" >/dev/null
  cat > "$RUN/postgres.env" <<ENV
export INGEST_TEST_POSTGRES_URL='$URL'
export INGEST_TEST_PG_BIN='$bin'
export INGEST_TEST_PG_PIDFILE='$DATA/postmaster.pid'
ENV
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop_server ;;
  stop-server) stop_server ;;
  start-server) start_server ;;
  *) echo "usage: $0 install|start|stop|stop-server|start-server" >&2; exit 2 ;;
esac
