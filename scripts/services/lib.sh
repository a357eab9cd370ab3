# Shared by scripts/services/*.sh (sourced, not run): quiet Debian installs, free ports, and
# how long a server may take to start.

# A server that is still starting is not a failure: on 2 cores shared with other work a JVM
# server took 130-180 s to start. A server that died is seen at once (each script checks).
READY_TIMEOUT="${INGEST_TEST_READY_TIMEOUT:-600}"

# apt_install [--recommends] PKG...: install the Debian packages that are not installed yet,
# quietly (without their Recommends unless --recommends).
# apt's output goes to a log (its tail is shown on failure); the package lists are refreshed
# only when a first attempt fails (a fresh machine has none, a stale one may 404).
# openssh-server is pinned to the installed openssh-client's version, so installing the
# server never upgrades the host's client as a side effect.
apt_install() {
  local want=() p
  _apt_recommends=--no-install-recommends
  if [ "${1:-}" = --recommends ]; then _apt_recommends=--install-recommends; shift; fi
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "${p%%=*}" 2>/dev/null | grep -q 'install ok installed' || want+=("$p")
  done
  [ ${#want[@]} -gt 0 ] || return 0
  if [ "$(id -u)" != 0 ]; then
    echo "apt_install: need root to install: ${want[*]}" >&2; return 1
  fi
  local log="${TMPDIR:-/tmp}/ingest-apt.$BASHPID.log" rc=0
  export DEBIAN_FRONTEND=noninteractive
  echo "apt: installing ${want[*]} (log: $log)"
  # One apt at a time (up.sh installs servers in parallel): wait for the others, not fail.
  exec {_apt_lock}>"${TMPDIR:-/tmp}/ingest-apt.lock"
  flock "$_apt_lock"
  if ! _apt_get "$log" "${want[@]}"; then
    if ! apt-get update -q >>"$log" 2>&1; then tail -20 "$log" >&2; rc=1
    elif ! _apt_get "$log" "${want[@]}"; then
      echo "apt-get install ${want[*]} failed:" >&2; tail -30 "$log" >&2; rc=1
    fi
  fi
  exec {_apt_lock}>&-
  [ "$rc" = 0 ] && rm -f "$log"
  return "$rc"
}

_apt_get() {  # LOG PKG...: one quiet apt-get install, openssh-server pinned (see apt_install)
  local log="$1" pkgs=() p client cand
  shift
  for p in "$@"; do
    if [ "$p" = openssh-server ] && client="$(dpkg-query -W -f='${Status} ${Version}' openssh-client 2>/dev/null)" \
        && [[ "$client" == *"install ok installed"* ]]; then
      client="${client##* }"
      if apt-cache madison openssh-server 2>/dev/null | awk -F' *[|] *' '{print $2}' | grep -qxF -- "$client"; then
        p="openssh-server=$client"
        pkgs+=("openssh-sftp-server=$client")
      else
        cand="$(apt-cache policy openssh-server 2>/dev/null | awk '/Candidate:/ {print $2}')"
        [ -n "$cand" ] || return 1  # no package lists yet: update and try again
        echo "WARNING: openssh-server $client (matching the installed openssh-client) is not in the" \
             "apt archive; installing openssh-server $cand upgrades openssh-client $client -> $cand" >&2
      fi
    fi
    pkgs+=("$p")
  done
  echo "apt-get install ${pkgs[*]}" >>"$log"
  apt-get install -y -q "$_apt_recommends" -o Dpkg::Use-Pty=0 "${pkgs[@]}" >>"$log" 2>&1
}

# free_ports N...: for each N, the first of N consecutive TCP ports free on 127.0.0.1 right now,
# one per line, all distinct (every socket stays bound until all are chosen). They come from
# the ephemeral range, so they never clash with the fixed ports people give in overrides.
free_ports() {
  python3 - "$@" <<'PY'
import random, socket, sys
lo, hi = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
held, bases = [], []
for n in (int(a) for a in sys.argv[1:]):
    for _ in range(1000):
        base = random.randrange(lo, hi - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            for s in socks:
                s.close()
            continue
        held += socks
        bases.append(base)
        break
    else:
        sys.exit(f"free_ports: no run of {n} free ports on 127.0.0.1")
for s in held:
    s.close()
print("\n".join(map(str, bases)))
PY
}
