#!/usr/bin/env bash
# Every Debian package in tools.list whose program is missing, in one quiet apt-get.
# No server: start/stop only write an empty tools.env for up.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib.sh"

case "${1:-}" in
  install)
    pkgs=()
    while read -r tool src _; do
      [[ -z "$tool" || "$tool" == \#* || "$src" != deb:* ]] && continue
      if [[ "$tool" == /* ]]; then compgen -G "$tool" >/dev/null && continue
      else command -v "$tool" >/dev/null 2>&1 && continue; fi
      [[ " ${pkgs[*]} " == *" ${src#deb:} "* ]] || pkgs+=("${src#deb:}")
    done < "$here/tools.list"
    [ ${#pkgs[@]} -eq 0 ] || apt_install "${pkgs[@]}" ;;
  start) mkdir -p "${INGEST_RUN_DIR:-/tmp/ingest-test-run}"; : > "${INGEST_RUN_DIR:-/tmp/ingest-test-run}/tools.env" ;;
  stop) ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
