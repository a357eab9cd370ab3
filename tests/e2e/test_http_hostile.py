"""Hostile HTTP clients against `ingest run`, over real sockets.

1. Clients that disconnect mid-body (any declared length, any part sent, any chunking): one
   log line each, no traceback, nothing accepted, and the service keeps answering.
2. Slow senders: a body that trickles in below `http.min_body_bytes_per_second` (after the
   grace period) or that is not complete within `http.body_timeout_seconds` gets a 408 JSON
   error and the connection is closed; a slow but steady sender above the minimum is accepted.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import wait_for
from tests.e2e._auth import sign_headers
from tests.e2e._service import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TENANT = "acme-corp"
CONFIG = """
http:
  body_timeout_seconds: 6
  min_body_bytes_per_second: 200
  body_grace_seconds: 1
"""


def record(i: int) -> bytes:
    return orjson.dumps({
        "schema_version": 3, "tenant_id": TENANT, "entity_type": "order",
        "entity_id": f"o-{i}", "revision": 1, "occurred_at": "2025-01-01T00:00:00Z",
        "attributes": {"pad": "x" * 200},
    })


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("http-hostile")
    cfg = root / "ingest.yaml"
    cfg.write_text(CONFIG)
    service = ServiceProcess(root / "data", config=cfg).start()
    # the start-up banner is printed once the service is ready, which can be after /health
    # answers: the log-line counts below must not see it arrive (the container CI did)
    wait_for(lambda: "stop: Ctrl-C or SIGTERM" in service.log_path.read_text(errors="replace"),
             30, "the start-up banner")  # fmt: skip
    yield service
    service.stop()


def request_head(svc: ServiceProcess, body: bytes, length: int | None = None) -> bytes:
    headers = sign_headers(TENANT, body, content_type="application/x-ndjson")
    lines = [f"POST /v1/webhooks/{TENANT}/shop HTTP/1.1", f"Host: 127.0.0.1:{svc.port}",
             f"Content-Length: {len(body) if length is None else length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def connect(svc: ServiceProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", svc.port), timeout=30)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """Status, headers, body, and whether the server then closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        rest += sock.recv(65536)
    sock.settimeout(5)
    try:
        closed = sock.recv(1) == b""
    except (TimeoutError, ConnectionResetError):
        closed = False
    return int(status_line.split()[1]), headers, rest[:length], closed


def log_lines(svc: ServiceProcess) -> list[str]:
    return svc.log_path.read_text(errors="replace").splitlines()


# ------------------------------------------------------------------------------ disconnects


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 30), sent=st.floats(0, 0.99), pieces=st.integers(1, 4),
       rst=st.booleans())
def test_disconnect_mid_body_logs_one_line(
    svc: ServiceProcess, n: int, sent: float, pieces: int, rst: bool
) -> None:
    body = b"\n".join(record(i) for i in range(n))
    before = len(log_lines(svc))
    cut = int(len(body) * sent)
    sock = connect(svc)
    sock.sendall(request_head(svc, body))
    step = max(1, cut // pieces)
    for i in range(0, cut, step):
        sock.sendall(body[i : min(cut, i + step)])
    if rst:  # an abortive close (RST), as a killed client does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(log_lines(svc)) == before:
        time.sleep(0.02)
    time.sleep(0.1)
    new = log_lines(svc)[before:]
    assert len(new) <= 1, "\n".join(new)
    assert not any("Traceback" in line or "ERROR" in line for line in new), "\n".join(new)
    assert all("disconnected" in line for line in new), "\n".join(new)


def test_many_aborts_then_normal_service(svc: ServiceProcess) -> None:
    body = b"\n".join(record(i) for i in range(20))
    before = len(log_lines(svc))
    for _ in range(300):
        sock = connect(svc)
        sock.sendall(request_head(svc, body) + body[: len(body) // 2])
        sock.close()
    time.sleep(1)
    new = log_lines(svc)[before:]
    assert len(new) <= 300, f"{len(new)} log lines for 300 aborts"
    assert "Traceback" not in "\n".join(new)
    r = svc.post_webhook(TENANT, "shop", body, content_type="application/x-ndjson")
    assert r.status_code == 202, r.text
    assert svc.health()["status"] in ("ok", "degraded")


# ------------------------------------------------------------------------------ slow senders


def test_trickling_body_gets_408_and_the_connection_closes(svc: ServiceProcess) -> None:
    body = b"\n".join(record(i) for i in range(10))
    sock = connect(svc)
    sock.sendall(request_head(svc, body))
    t0 = time.monotonic()
    sent = 0
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        # 50 bytes/s, far below the 200 bytes/s minimum, until the server answers
        while sent < len(body) and not select.select([sock], [], [], 0)[0]:
            sock.sendall(body[sent : sent + 5])
            sent += 5
            time.sleep(0.1)
    elapsed = time.monotonic() - t0
    status, headers, payload, closed = read_response(sock)
    assert status == 408, payload
    doc = json.loads(payload)
    assert doc["error"] == "request_timeout" and "too slowly" in doc["reason"]
    assert headers.get("connection") == "close" and closed
    assert elapsed < 5, f"answered after {elapsed:.1f} s"
    assert sent < len(body)


def test_body_not_complete_in_time_gets_408(svc: ServiceProcess) -> None:
    """Fast enough on average (300 bytes/s) but the body needs longer than 6 s in total."""
    body = b"\n".join(record(i) for i in range(12))
    assert len(body) / 300 > 8
    sock = connect(svc)
    sock.sendall(request_head(svc, body))
    t0 = time.monotonic()
    sent = 0
    try:
        while sent < len(body) and time.monotonic() - t0 < 12:
            sock.sendall(body[sent : sent + 30])
            sent += 30
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, _, payload, closed = read_response(sock)
    assert status == 408, payload
    assert 5.5 < time.monotonic() - t0 < 12
    assert closed


def test_slow_but_steady_sender_is_accepted(svc: ServiceProcess) -> None:
    body = b"\n".join(record(i) for i in range(4))  # ~1 KB at ~2 KB/s
    sock = connect(svc)
    sock.sendall(request_head(svc, body))
    for i in range(0, len(body), 100):
        sock.sendall(body[i : i + 100])
        time.sleep(0.05)
    status, _, payload, _ = read_response(sock)
    assert status == 202, payload
    assert json.loads(payload)["records"] == 4


def test_idle_after_headers_gets_408(svc: ServiceProcess, tmp_path: Path) -> None:
    body = record(1)
    sock = connect(svc)
    sock.sendall(request_head(svc, body))  # then nothing at all
    t0 = time.monotonic()
    status, _, payload, closed = read_response(sock)
    assert status == 408 and closed, payload
    assert time.monotonic() - t0 < 4
