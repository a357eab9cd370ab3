#!/usr/bin/env bash
# cargo, if missing: `make install` builds the decoder's compiled fast path (ingest_native/,
# a uv workspace member built by maturin), which needs cargo and rustc. Debian 12's
# `cargo-web`/`rustc-web` (bookworm-security, Rust 1.8x-1.9x), not its `cargo` (0.66): that one
# fetches the crates.io index with git from github.com, which is not reachable everywhere; the
# newer one reads it over HTTPS (sparse protocol) from index.crates.io.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
command -v cargo >/dev/null 2>&1 && exit 0
[ -x "$HOME/.cargo/bin/cargo" ] && exit 0
. "$here/services/lib.sh"
apt_install cargo-web
