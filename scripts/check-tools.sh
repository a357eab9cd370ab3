#!/usr/bin/env bash
# Is every program the tests, benchmarks and scripts run present? (scripts/services/tools.list)
# Exit 1 with the full list of what is missing and where each comes from; run first by
# `make test` (after the installs, before any server or test) and by `make doctor`.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
list="${TOOLS_LIST:-$root/scripts/services/tools.list}"  # TOOLS_LIST: for its test
PATH="$root/.venv/bin:$PATH:$HOME/.local/bin:/usr/sbin:/sbin"
missing=()
while read -r tool src used; do
  [[ -z "$tool" || "$tool" == \#* ]] && continue
  if [[ "$tool" == /* ]]; then compgen -G "$tool" >/dev/null && continue
  else command -v "$tool" >/dev/null 2>&1 && continue; fi
  missing+=("$(printf '  %-36s %-28s %s' "$tool" "$src" "$used")")
done < "$list"
if [ ${#missing[@]} -gt 0 ]; then
  echo "check-tools: ${#missing[@]} program(s) missing (deb: scripts/services/tools.sh install;" \
       "uv: make install; make: make uv):" >&2
  printf '%s\n' "${missing[@]}" >&2
  exit 1
fi
echo "check-tools: all $(grep -cvE '^(#|$)' "$list") programs of scripts/services/tools.list present"
