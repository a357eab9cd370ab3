#!/usr/bin/env bash
# OpenSSH sshd (Debian openssh-server) as the tests' SFTP server: own host key, 127.0.0.1 only,
# key login for user `ingestsftp`, sftp only (ForceCommand internal-sftp -d <inbox>).
#   sshd.sh install | start | stop      (see scripts/services/README.md; needs root)
# The inbox lives under the run dir, not a chroot: sshd refuses a chroot under /tmp.
# ports: INGEST_TEST_SFTP_PORT
set -euo pipefail
. "$(dirname "$0")/lib.sh"
run_dir="${INGEST_RUN_DIR:-/tmp/ingest-test-run}"
data="$run_dir/sshd"
env_file="$run_dir/sshd.env"
pid_file="$run_dir/sshd.pid"
port="${INGEST_TEST_SFTP_PORT:-12222}"
user="${INGEST_TEST_SFTP_USER:-ingestsftp}"

install() {
  # openssh-server pinned to the installed client's version (lib.sh): the client is not upgraded
  if [ ! -x /usr/sbin/sshd ] || ! command -v sftp >/dev/null; then
    apt_install openssh-client openssh-server
  fi
  # '*' (no password) rather than a locked '!' account, which sshd refuses even for keys.
  id "$user" >/dev/null 2>&1 || useradd -M -s /usr/sbin/nologin -p '*' "$user"
}

stop() {
  if [ -f "$pid_file" ]; then
    pid="$(cat "$pid_file")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pid_file"
  fi
}

start() {
  stop
  id "$user" >/dev/null 2>&1 || { echo "sshd.sh: user $user missing; run '$0 install'" >&2; exit 1; }
  rm -rf "$data"
  mkdir -p "$data/inbox" /run/sshd
  chown "$user" "$data/inbox"
  chmod 755 "$run_dir" "$data"
  ssh-keygen -q -t ed25519 -N '' -f "$data/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$data/client_key"
  cp "$data/client_key.pub" "$data/authorized_keys"
  chmod 644 "$data/authorized_keys"
  cat > "$data/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $port
HostKey $data/host_key
PidFile $pid_file
AuthorizedKeysFile $data/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers $user
UsePAM no
StrictModes no
X11Forwarding no
AllowTcpForwarding no
Subsystem sftp internal-sftp
ForceCommand internal-sftp -d $data/inbox
EOF
  /usr/sbin/sshd -t -f "$data/sshd_config"
  /usr/sbin/sshd -D -e -f "$data/sshd_config" >"$data/sshd.log" 2>&1 &
  echo $! > "$pid_file"
  echo "pwd" > "$data/probe.batch"
  local deadline=$((SECONDS + READY_TIMEOUT))
  until sftp -q -b "$data/probe.batch" -i "$data/client_key" -P "$port" \
      -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes \
      "$user@127.0.0.1" >/dev/null 2>&1; do
    kill -0 "$(cat "$pid_file")" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ] || {
      echo "sshd not ready (exited, or ${READY_TIMEOUT}s passed)" >&2; tail -20 "$data/sshd.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$data/host_key.pub")" > "$data/known_hosts"
  cat > "$env_file" <<EOF
export INGEST_TEST_SFTP_HOST=127.0.0.1
export INGEST_TEST_SFTP_PORT=$port
export INGEST_TEST_SFTP_USER=$user
export INGEST_TEST_SFTP_KEY=$data/client_key
export INGEST_TEST_SFTP_HOST_KEY='$(cut -d' ' -f1,2 "$data/host_key.pub")'
export INGEST_TEST_SFTP_KNOWN_HOSTS=$data/known_hosts
export INGEST_TEST_SFTP_DIR=$data/inbox
export INGEST_TEST_SFTP_PID_FILE=$pid_file
EOF
  echo "sshd (sftp) ready at 127.0.0.1:$port, user $user, inbox $data/inbox; env in $env_file"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
