#!/usr/bin/env bash
# uv, if missing: `pip install --user uv` (to ~/.local/bin, which the Makefile puts on PATH).
# Debian's python3 has no pip and is "externally managed" (PEP 668): python3-pip comes from
# apt first, and --break-system-packages lets a --user install proceed (it touches nothing of
# Debian's: only ~/.local).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
command -v uv >/dev/null 2>&1 && exit 0
[ -x "$HOME/.local/bin/uv" ] && exit 0
if ! python3 -m pip --version >/dev/null 2>&1; then
  . "$here/services/lib.sh"
  apt_install python3-pip
fi
echo "installing uv with pip (--user)"
python3 -m pip install --quiet --user --break-system-packages uv 2>/dev/null \
  || python3 -m pip install --quiet --user uv
