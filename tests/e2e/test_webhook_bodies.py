"""Webhook bodies as senders really write them, against `ingest run` (embedded).

Every body gets a clear answer: 202 and each record in the sink or in the DLQ with its reason,
or a 4xx with a JSON reason; never a 500, never a traceback in the log, never a record stored
other than as sent.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.e2e._service import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
TENANT = "acme-corp"


def rec(eid: str, **attrs: Any) -> dict[str, Any]:
    return {"schema_version": 3, "tenant_id": TENANT, "entity_type": "order",
            "entity_id": eid, "revision": 1, "occurred_at": "2025-01-01T00:00:00Z",
            "attributes": attrs}  # fmt: skip


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = ServiceProcess(tmp_path_factory.mktemp("bodies") / "data").start()
    yield service
    service.stop()


def stored(svc: ServiceProcess, eid: str) -> dict[str, Any] | None:
    with sqlite3.connect(svc.data_dir / "sink.db") as c:
        row = c.execute("SELECT attributes FROM entities WHERE entity_id = ?", (eid,)).fetchone()
    return None if row is None else dict(json.loads(row[0]))


def dlq_kind(svc: ServiceProcess, eid: str) -> str | None:
    with sqlite3.connect(svc.data_dir / "state.db") as c:
        row = c.execute("SELECT detail FROM dlq WHERE entity_id = ?", (eid,)).fetchone()
    return None if row is None else str(json.loads(row[0])["kind"])


@pytest.mark.parametrize("indent", [2, "\t", 0])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_pretty_printed_bodies_are_accepted(svc: ServiceProcess, indent: Any,
                                            newline: str) -> None:
    tag = f"{len(str(indent))}{len(newline)}"
    one = json.dumps(rec(f"pretty-{tag}", amount=1), indent=indent).replace("\n", newline)
    many = json.dumps([rec(f"pretty-{tag}-{i}", amount=i) for i in range(3)], indent=indent)
    for body, n in ((one, 1), (many.replace("\n", newline), 3)):
        r = svc.post_webhook(TENANT, "pretty", body)
        assert r.status_code == 202, r.text
        assert r.json()["records"] == n
    wait_for(lambda: stored(svc, f"pretty-{tag}") == {"amount": 1}, 60, "the pretty record")
    wait_for(lambda: all(stored(svc, f"pretty-{tag}-{i}") == {"amount": i} for i in range(3)),
             60, "the pretty array")  # fmt: skip
    assert "Traceback" not in svc.log_path.read_text(errors="replace")


def test_integers_beyond_64_bits_in_an_array_are_refused_not_rounded(
    svc: ServiceProcess,
) -> None:
    big = 123456789012345678901234567890
    body = (
        "["
        + json.dumps(rec("big-in-array", x=0)).replace('"x": 0', f'"x": {big}')
        + ","
        + json.dumps(rec("fine-in-array", x=2**64 - 1))
        + "]"
    )
    r = svc.post_webhook(TENANT, "arrays", body)
    assert r.status_code == 202, r.text
    wait_for(lambda: dlq_kind(svc, "big-in-array") == "range", 60, "a range DLQ entry")
    wait_for(lambda: stored(svc, "fine-in-array") == {"x": 2**64 - 1}, 60, "the exact uint64")
    assert stored(svc, "big-in-array") is None


def test_an_array_with_an_element_nested_1000_deep(svc: ServiceProcess) -> None:
    """msgspec gives up at ~1,000 levels (orjson reads 1,024) and the fallback re-serialized
    with orjson, which writes 255: 500 and a traceback. Now 202: the sibling stored, the deep
    element in the DLQ."""
    deep = "[" * 1000 + "1" + "]" * 1000
    body = "[" + json.dumps(rec("beside-deep", x=2**64 - 1)) + ", " + deep + "]"
    r = svc.post_webhook(TENANT, "deep", body)
    assert r.status_code == 202 and r.json()["records"] == 2, r.text
    wait_for(lambda: stored(svc, "beside-deep") == {"x": 2**64 - 1}, 60, "the sibling")
    assert "Traceback" not in svc.log_path.read_text(errors="replace")


def test_content_encodings(svc: ServiceProcess) -> None:
    """gzip and deflate bodies are inflated (signed over the bytes sent); an encoding the door
    cannot undo is 415, bytes that are not what the header says 400, an inflated body over
    http.max_body_bytes 413. The plain body of a bogus header was accepted as is before, and a
    gzip body got a 400 about UTF-8 surrogates."""
    import gzip
    import zlib

    import httpx

    from tests.e2e._auth import sign_headers

    def send(body: bytes, encoding: str) -> httpx.Response:
        headers = {**sign_headers(TENANT, body), "Content-Encoding": encoding}
        return httpx.post(f"{svc.url}/v1/webhooks/{TENANT}/enc", content=body, headers=headers,
                          timeout=30)  # fmt: skip

    def body(eid: str) -> bytes:
        return json.dumps([rec(eid, amount=1), rec(eid + "-b", amount=2)]).encode()

    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    cases = {
        "gzip": gzip.compress(body("enc-gzip")),
        "x-gzip": gzip.compress(body("enc-xgzip")),
        "deflate": zlib.compress(body("enc-deflate")),
        "identity": body("enc-identity"),
        "gzip, gzip": gzip.compress(gzip.compress(body("enc-twice"))),
        "DEFLATE": raw_deflate.compress(body("enc-rawdeflate")) + raw_deflate.flush(),
    }
    for encoding, sent in cases.items():
        r = send(sent, encoding)
        assert r.status_code == 202 and r.json()["records"] == 2, (encoding, r.text)
    # two gzip members (the second one's records were dropped with a 202); zlib with a small
    # window (header 0x48, taken for raw deflate: 400)
    def lines(eid: str) -> bytes:  # NDJSON: two members' bodies are one body of 4 lines
        return b"".join(json.dumps(rec(e, amount=1)).encode() + b"\n" for e in (eid, eid + "x"))

    sent = gzip.compress(lines("enc-members")) + gzip.compress(lines("enc-member2"))
    headers = {**sign_headers(TENANT, sent, content_type="application/x-ndjson"),
               "Content-Encoding": "gzip"}  # fmt: skip
    r = httpx.post(f"{svc.url}/v1/webhooks/{TENANT}/enc", content=sent, headers=headers,
                   timeout=30)  # fmt: skip
    assert r.status_code == 202 and r.json()["records"] == 4, r.text
    small_window = zlib.compressobj(wbits=12)
    r = send(small_window.compress(body("enc-window")) + small_window.flush(), "deflate")
    assert r.status_code == 202 and r.json()["records"] == 2, r.text
    for eid in ("enc-gzip", "enc-xgzip", "enc-deflate", "enc-identity", "enc-twice",
                "enc-rawdeflate", "enc-members", "enc-member2x", "enc-window"):
        wait_for(lambda eid=eid: stored(svc, eid) == {"amount": 1}, 60, eid)  # type: ignore[misc]
    for encoding, sent, status, error in (
        ("br", body("enc-br"), 415, "unsupported_encoding"),
        ("gzip, zstd", body("enc-zstd"), 415, "unsupported_encoding"),
        ("gzip", body("enc-notgzip"), 400, "bad_encoding"),
        ("deflate", b"\x78\x9c garbage", 400, "bad_encoding"),
        ("gzip", gzip.compress(body("enc-cut"))[:-12], 400, "bad_encoding"),
        ("gzip", gzip.compress(body("enc-junk")) + b"junk", 400, "bad_encoding"),
        ("gzip", gzip.compress(b" " * (6 << 20)), 413, "body_too_large"),  # 6 MiB > 5 MiB
    ):
        r = send(sent, encoding)
        assert r.status_code == status, (encoding, r.status_code, r.text)
        assert r.json()["error"] == error and r.json()["reason"], r.text
    assert stored(svc, "enc-br") is None and stored(svc, "enc-notgzip") is None
    assert "Traceback" not in svc.log_path.read_text(errors="replace")
