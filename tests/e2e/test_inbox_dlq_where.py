"""An inbox line that is not a record goes to the DLQ saying which file and where in it.

Found by dropping hostile files into a running service: each bad line was a VALIDATION_FAIL
with its bytes and the parser's complaint but no file name, so with several files in flight an
operator could not tell the sender which file to fix. Every class of unreadable line (NUL
bytes, invalid UTF-8, UTF-16, gzip bytes in a `.jsonl`, a cut-off object, a scalar) in files
with awkward names (spaces, unicode, a leading dash, very long) now carries
`detail.position = {"file", "offset"}` (the offset just after the line).
"""

from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.e2e._service import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
TENANT = "acme-corp"

GOOD = json.dumps({"schema_version": 3, "tenant_id": TENANT, "entity_type": "order",
                   "entity_id": "good", "revision": 1, "occurred_at": "2025-01-01T00:00:00Z",
                   "attributes": {}}).encode()  # fmt: skip
BAD_LINES = [
    b'{"a":"\x00"}',
    b"\xff\xfe{}",
    '{"a": 1}'.encode("utf-16"),
    gzip.compress(b'{"a": 1}').replace(b"\n", b" "),
    b'{"schema_version": 3, "tenant_id"',
    b"42",
]
NAMES = ["with space.jsonl", "ünï–code.jsonl", "-dash.jsonl", "L" * 200 + ".jsonl", "plain.jsonl"]


def dlq_rows(data: Path) -> list[tuple[bytes, dict[str, Any]]]:
    with sqlite3.connect(data / "state.db") as c:
        return [(bytes(p), json.loads(d)) for p, d in c.execute("SELECT payload, detail FROM dlq")]


def test_every_bad_inbox_line_names_its_file_and_offset(tmp_path: Path) -> None:
    data = tmp_path / "data"
    svc = ServiceProcess(data).start()
    try:
        inbox = data / "inbox" / TENANT
        inbox.mkdir(parents=True)
        expected: dict[bytes, tuple[str, int]] = {}
        for n, name in enumerate(NAMES):
            content = b""
            for i, bad in enumerate(BAD_LINES):
                line = bad + b" " * n + str(i).encode() * (n + 1)  # unique bytes per file
                content += GOOD.replace(b'"good"', f'"good-{n}-{i}"'.encode()) + b"\n"
                content += line + b"\n"
                expected[line] = (name, len(content))
            (tmp_path / "staging").write_bytes(content)
            (tmp_path / "staging").rename(inbox / name)
        wait_for(lambda: len(dlq_rows(data)) >= len(expected), 90, "every bad line in the DLQ")
        rows = dlq_rows(data)
        assert len(rows) == len(expected)
        for payload, detail in rows:
            assert detail["position"] == {"file": expected[payload][0],
                                          "offset": expected[payload][1]}, (payload, detail)
    finally:
        svc.stop()
