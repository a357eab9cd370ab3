#!/usr/bin/env bash
# Build the service's image (Dockerfile) with podman: localhost/ingest:latest and
# localhost/ingest:<commit>, FROM the debootstrap base (debian-base.sh builds it if missing).
#   scripts/image/build.sh            (root; INGEST_IMAGE overrides the name)
# Layers are cached in podman's store: a rebuild after a code change reuses the Debian and
# dependency layers; a fresh machine builds all (see docs/deploy.md for the times).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
. "$here/lib.sh"
image="${INGEST_IMAGE:-localhost/ingest:latest}"

podman_setup
"$here/debian-base.sh"
tags=(-t "$image")
commit="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || true)"
[ -n "$commit" ] && tags+=(-t "${image%:*}:$commit")
t0=$(date +%s)
# --network host: the build downloads from Debian and PyPI next to everything else here.
podman build --network host --layers --secret "id=ca_bundle,src=$CA_BUNDLE" \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" "${tags[@]}" -f "$root/Dockerfile" "$root"
echo "$image built in $(( $(date +%s) - t0 ))s ($(podman image inspect -f '{{.Size}}' "$image") bytes)"
