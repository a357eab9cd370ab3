#!/usr/bin/env bash
# Neo4j 5.26 LTS test server: the real database from Maven Central (org.neo4j.test:neo4j-harness),
# started by scripts/services/neo4j/Launcher.java with Java 17's single-file source launch.
#   neo4j.sh install | start | stop        (interface: scripts/services/README.md)
# Bolt on 127.0.0.1:${INGEST_TEST_NEO4J_BOLT_PORT:-17687}, HTTP on ${INGEST_TEST_NEO4J_HTTP_PORT:-17474}.
# Auth is on, as in production: user neo4j, a password generated per start (in neo4j.env).
# ports: INGEST_TEST_NEO4J_BOLT_PORT INGEST_TEST_NEO4J_HTTP_PORT
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib.sh"
run_dir="${INGEST_RUN_DIR:-/tmp/ingest-test-run}"
cache="${HOME}/.cache/ingest-services/neo4j"
bolt_port="${INGEST_TEST_NEO4J_BOLT_PORT:-17687}"
http_port="${INGEST_TEST_NEO4J_HTTP_PORT:-17474}"
data="$run_dir/neo4j"
pid_file="$run_dir/neo4j.pid"
log="$data/server.log"
# C1 only: half the CPU to start and under the tests' load (measured: start 23 vs 49 CPU-s, the
# Neo4j tests 25 vs 59). Benchmarks may want full JIT: INGEST_TEST_NEO4J_JAVA_OPTS=''.
java_opts="${INGEST_TEST_NEO4J_JAVA_OPTS--XX:TieredStopAtLevel=1}"

install() {
  command -v java >/dev/null && command -v mvn >/dev/null || apt_install openjdk-17-jre-headless maven
  mkdir -p "$cache"
  # Re-resolve only when the pom changed; the jar set is the install marker.
  if ! cmp -s "$here/neo4j/pom.xml" "$cache/pom.xml" || [ ! -f "$cache/lib/.complete" ]; then
    cp "$here/neo4j/pom.xml" "$cache/pom.xml"
    rm -rf "$cache/lib"
    (cd "$cache" && mvn -q -B -Dstyle.color=never dependency:copy-dependencies)
    touch "$cache/lib/.complete"
  fi
  cp "$here/neo4j/Launcher.java" "$cache/Launcher.java"
}

running() { [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }

start() {
  [ -f "$cache/lib/.complete" ] || install
  cp "$here/neo4j/Launcher.java" "$cache/Launcher.java"
  if running; then echo "neo4j already running (pid $(cat "$pid_file"))" >&2; exit 1; fi
  rm -rf "$data" && mkdir -p "$data"
  local password t0
  password="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086  # word splitting of the options is wanted
  (cd "$cache" && exec nohup java -Xmx1g $java_opts -cp 'lib/*' Launcher.java \
      "$bolt_port" "$http_port" "$data/db" "$password" >"$log" 2>&1 </dev/null) &
  echo $! >"$pid_file"
  # Bolt answers before the password is set: READY (printed after it) is the real signal.
  local deadline=$((SECONDS + READY_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if grep -q '^READY ' "$log"; then break; fi
    if ! running; then echo "neo4j exited during start; log:" >&2; tail -50 "$log" >&2; exit 1; fi
    sleep 0.5
  done
  grep -q '^READY ' "$log" || { echo "neo4j not ready after ${READY_TIMEOUT}s; log:" >&2; tail -50 "$log" >&2; stop; exit 1; }
  cat >"$run_dir/neo4j.env" <<ENV
export INGEST_TEST_NEO4J_URI=bolt://127.0.0.1:$bolt_port
export INGEST_TEST_NEO4J_USER=neo4j
export INGEST_TEST_NEO4J_PASSWORD=$password
export INGEST_TEST_NEO4J_HTTP_URL=http://127.0.0.1:$http_port
export INGEST_TEST_NEO4J_PID_FILE=$pid_file
ENV
  awk -v t0="$t0" -v t1="$(date +%s.%N)" -v port="$bolt_port" -v pid="$(cat "$pid_file")" \
    'BEGIN { printf "neo4j ready on bolt://127.0.0.1:%s in %.1fs (pid %s)\n", port, t1 - t0, pid }'
}

stop() {
  running || { rm -f "$pid_file"; return 0; }
  local pid; pid="$(cat "$pid_file")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.5; fi
  rm -f "$pid_file"
  echo "neo4j stopped (pid $pid)"
}

mkdir -p "$run_dir"
case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
