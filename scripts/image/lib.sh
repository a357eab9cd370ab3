# Podman on this kind of host (sourced, not run): `podman_setup` installs podman, runc and
# debootstrap from Debian if missing and exports CONTAINERS_CONF, a containers.conf of our own
# (/etc is left alone) with the three settings this host needs (../../../shared SERVICES.md,
# "Container images"): runc (crun refuses the host's hybrid cgroups), cgroupfs, and default
# ulimits no higher than the host's hard limits (there is no CAP_SYS_RESOURCE).
# Also: CA_BUNDLE, the host's CA bundle, to pass into builds and containers (HTTPS is
# re-signed by a local CA here) without baking it into an image.
. "$(dirname "${BASH_SOURCE[0]}")/../services/lib.sh"

BASE_IMAGE="${INGEST_BASE_IMAGE:-localhost/debian:bookworm}"
CA_BUNDLE="${INGEST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

podman_setup() {
  command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
    || apt_install --recommends podman runc debootstrap
  local dir="${INGEST_PODMAN_CONF_DIR:-$HOME/.cache/ingest-podman}" nofile nproc pidmax
  nofile="$(ulimit -Hn)"; nproc="$(ulimit -Hu)"; pidmax="$(cat /proc/sys/kernel/pid_max)"
  [ "$nofile" = unlimited ] && nofile=1048576
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pidmax" ]; then nproc="$pidmax"; fi
  mkdir -p "$dir"
  cat > "$dir/containers.conf.tmp" <<CONF
# Written by scripts/image/lib.sh for this host (see its header).
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
  mv "$dir/containers.conf.tmp" "$dir/containers.conf"
  export CONTAINERS_CONF="$dir/containers.conf"
}
