"""Exit 0 once a Kafka broker answers a Metadata request that lists itself (stdlib only).

A TCP connect is not enough: the port opens before the broker has joined its own KRaft
quorum and can serve metadata. Metadata v4 is the oldest version Kafka 4 still accepts.
Usage: ready.py HOST PORT TIMEOUT_SECONDS
"""

import socket
import struct
import sys
import time


def metadata_brokers(host: str, port: int) -> int:
    client = b"ingest-ready"
    # header v1: api_key=3 (Metadata), version=4, correlation id, client id; body: all topics
    # (null array), no auto-creation.
    body = struct.pack(">hhih", 3, 4, 7, len(client)) + client + struct.pack(">ib", -1, 0)
    with socket.create_connection((host, port), timeout=2) as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", _read(s, 4))[0]
        resp = _read(s, size)
    corr, _throttle, nbrokers = struct.unpack(">iii", resp[:12])
    if corr != 7:
        raise OSError(f"unexpected correlation id {corr}")
    return int(nbrokers)


def _read(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf


def main() -> int:
    host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            if metadata_brokers(host, port) >= 1:
                return 0
            last = "metadata lists no broker yet"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    print(f"kafka at {host}:{port} not ready after {timeout}s: {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
