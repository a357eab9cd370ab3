#!/usr/bin/env bash
# Proof that CI passes on a fresh machine: `.ci/run` in a clean container built from a
# debootstrap base (scripts/image/debian-base.sh), on a fresh `git clone` of the current commit.
#   scripts/ci-in-container.sh [--keep]      (root; --keep leaves the container for a look)
# The container is Debian 12 + make + python3 + ca-certificates (scripts/image/ci.Containerfile):
# no pyenv, uv, Java, Postgres client or any server. The one thing it takes from this host is
# trust in the local CA that re-signs HTTPS here: the host's bundle is mounted read-only and
# its extra certificates are added to the container's trust store at run time, never baked
# into an image. Host network: the run's servers take free ports next to anyone else's.
# Log: $INGEST_CI_LOG (default /tmp/ingest-ci-in-container.<time>.log); exit status = .ci/run's.
set -euo pipefail
# All in one function: bash parses it whole before running, so editing this file while a
# run is going (it takes long) cannot change what the run does.
main() {
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/image/lib.sh"
keep=0; [ "${1:-}" = --keep ] && keep=1
ci_image="${INGEST_CI_IMAGE:-localhost/ingest-ci:bookworm}"
log="${INGEST_CI_LOG:-/tmp/ingest-ci-in-container.$(date +%Y%m%d-%H%M%S).log}"
commit="$(git -C "$root" rev-parse HEAD)"
[ -z "$(git -C "$root" status --porcelain --untracked-files=no)" ] \
  || echo "ci-in-container: uncommitted changes are NOT tested (a clone of $commit is)" >&2

podman_setup
"$root/scripts/image/debian-base.sh"
work="$(mktemp -d /tmp/ingest-ci-src.XXXXXX)"
name="ingest-ci-$(date +%s)-$$"
# The container shares the host's network namespace, so the bridges its own podman makes
# (podman0, cni-podman0: 10.88.0.0/16 both) outlive it; a later run then found two routes to
# that subnet, the first one down, and its image test could not reach its container ("No
# route to host"). Bridges that appear during the run are removed after it.
# A podman bridge left DOWN with nothing attached (by an earlier run, or by `make image-test` on
# the host) does the same harm before a run as after one: removed first (seen: all 3 image
# tests "not ready in 180 s" at bdb76a2 with the host's idle cni-podman0 up before the run).
for link in podman0 cni-podman0; do
  ip -o link show "$link" 2>/dev/null | grep -q 'NO-CARRIER' && ip link del "$link" 2>/dev/null || true
done
links_before="$(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort)"
cleanup() {
  rm -rf "$work"
  [ "$keep" = 1 ] || podman rm -f "$name" >/dev/null 2>&1 || true
  [ "$keep" = 1 ] || for link in $(ip -o link show type bridge | awk -F': ' '{print $2}'); do
    grep -qx "$link" <<<"$links_before" || ip link del "$link" 2>/dev/null || true
  done
}
trap cleanup EXIT
echo "building $ci_image (scripts/image/ci.Containerfile)"
podman build -q --network host -t "$ci_image" -f "$root/scripts/image/ci.Containerfile" \
  "$root/scripts/image" >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
git clone -q --no-local --no-checkout "$root" "$work/ci/ingest"
git -C "$work/ci/ingest" checkout -q "$commit"
rm -rf "$work/ci/ingest/.git/hooks"
echo "$commit" > "$work/ci/commit"

# Run inside: trust the host's extra CAs (the machine's setup, not the project's), then CI.
inner='set -euo pipefail
mkdir -p /usr/local/share/ca-certificates/host /tmp/ca
cd /tmp/ca
split() { awk "/BEGIN CERT/{n++; f=\"$2-\" n \".crt\"} n{print > f} /END CERT/{close(f)}" "$1"; }
split /run/host-ca.crt host
split /etc/ssl/certs/ca-certificates.crt deb
md5sum deb-*.crt | cut -d" " -f1 | sort > deb.sums
for f in host-*.crt; do
  grep -qx "$(md5sum < "$f" | cut -d" " -f1)" deb.sums || cp "$f" /usr/local/share/ca-certificates/host/
done
update-ca-certificates >/dev/null 2>&1
echo "trusting $(ls /usr/local/share/ca-certificates/host | wc -l) CA certificate(s) of the host"
cd /ci/ingest
echo "== .ci/run in $(. /etc/os-release; echo "$PRETTY_NAME"), commit $(cat /ci/commit), $(nproc) cores"
s=$(date +%s)
rc=0; .ci/run 2>&1 | while IFS= read -r line; do printf "%(%T)T %s\n" -1 "$line"; done || rc=$?
echo "== .ci/run exit $rc after $(( $(date +%s) - s ))s"
exit $rc'
ca_env=()
for v in SSL_CERT_FILE REQUESTS_CA_BUNDLE PIP_CERT AWS_CA_BUNDLE CURL_CA_BUNDLE; do
  ca_env+=(-e "$v=/etc/ssl/certs/ca-certificates.crt")
done
# --privileged and a container store of its own: .ci/run's `make image-test` runs podman
# inside (debootstrap, build, run); the store starts empty, as on a fresh machine.
mkdir -p "$work/containers"
podman create -q --name "$name" --init --network host --shm-size 1g --privileged \
  -v "$work/containers:/var/lib/containers" -v "$CA_BUNDLE:/run/host-ca.crt:ro" "${ca_env[@]}" -e PIP_DISABLE_PIP_VERSION_CHECK=1 \
  "$ci_image" bash -c "$inner" >/dev/null
podman cp "$work/ci" "$name:/ci"

echo "ci-in-container: .ci/run on $commit in $name; log $log"
t0=$(date +%s)
rc=0
podman start -a "$name" > "$log" 2>&1 || rc=$?
echo "ci-in-container: exit $rc in $(( ($(date +%s) - t0) / 60 ))m$(( ($(date +%s) - t0) % 60 ))s; log $log"
grep -E '^([0-9:]{8} )?(=+ .*(passed|failed|error).* in |== \.ci/run exit|FAILED|ERROR)' "$log" || tail -20 "$log"
exit "$rc"
}
main "$@"
