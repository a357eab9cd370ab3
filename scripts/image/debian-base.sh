#!/usr/bin/env bash
# The base image every image of this project starts from: Debian 12 (bookworm) minbase from
# Debian's archive (no image registry is reachable here), imported as localhost/debian:bookworm
# (INGEST_BASE_IMAGE). Nothing else in it: no CA of this host, no Python, no build tools.
#   scripts/image/debian-base.sh            build it unless it exists
#   scripts/image/debian-base.sh --rebuild  build it again
# Needs root (debootstrap); installs podman, runc and debootstrap if missing (lib.sh).
# In a Dockerfile: `FROM localhost/debian:bookworm`; HTTPS from a build needs the host's CA
# bundle as a build secret (see scripts/image/lib.sh, CA_BUNDLE).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib.sh"
mirror="${INGEST_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

podman_setup
if [ "${1:-}" != --rebuild ] && podman image exists "$BASE_IMAGE"; then
  echo "$BASE_IMAGE exists ($(podman image inspect -f '{{.Created}}' "$BASE_IMAGE")); --rebuild to build it again"
  exit 0
fi
work="$(mktemp -d /tmp/ingest-debian-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
echo "debootstrap --variant=minbase bookworm from $mirror (log: $work/debootstrap.log)"
debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
# The same suites as a Debian 12 machine: updates and security too.
rm -f "$work/rootfs/etc/apt/sources.list"
cat > "$work/rootfs/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
tar -C "$work/rootfs" -c . | podman import -q --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase bookworm $mirror" - "$BASE_IMAGE" >/dev/null
echo "$BASE_IMAGE built in $(( $(date +%s) - t0 ))s ($(podman image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes)"
