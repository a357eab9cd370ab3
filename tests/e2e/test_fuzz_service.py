"""Hostile input through the running service: every accepted record ends in the sink or the
DLQ exactly once, and every source keeps moving.

One service process (embedded, as `make run`) takes generated records by webhook and generated
files through the inbox: arbitrary JSON, record-shaped bodies with out-of-range and huge
numbers, odd unicode (NUL, lone surrogates, bidi marks), deep nesting, invalid UTF-8, v1/v2/v3
envelopes, odd file names. After each example the test reads the sink and the DLQ (SQLite,
read-only) and checks each line: a record of ours is in the sink xor in the DLQ, anything
else is in the DLQ exactly once; then a canary record must get through and no source may be
stalled or restarting. Bounded: FUZZ_EXAMPLES examples (default 25, about a minute).
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests._hostile import FILE_NAMES, SentLine, hostile_records, render
from tests.e2e._service import ServiceProcess

pytestmark = pytest.mark.e2e
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
TENANTS = ("fuzz-a", "fuzz-b")
RUN = uuid.uuid4().hex[:6]
COUNTER = itertools.count()


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("fuzz")
    config = root / "ingest.yaml"
    config.write_text("health: {stall_after_seconds: 20}\n")
    service = ServiceProcess(root / "data", config=config)
    service.log_path = root / "service.log"
    service.start()
    yield service
    code = service.terminate(timeout=60)
    log = service.log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)


def outcomes(data: Path, tenant: str, lines: list[SentLine]) -> list[tuple[int, int]]:
    """(rows in the sink, rows in the DLQ) per line."""
    out = []
    with _ro(data / "sink.db") as sink, _ro(data / "state.db") as state:
        for line, eid in lines:
            in_sink = 0
            if eid is not None and _encodable(eid):  # a lone surrogate is never stored
                (in_sink,) = sink.execute(
                    "SELECT count(*) FROM entities WHERE tenant = ? AND entity_id = ?",
                    (tenant, eid)).fetchone()
            (in_dlq,) = state.execute(
                "SELECT count(*) FROM dlq WHERE tenant = ? AND payload = ?", (tenant, line)
            ).fetchone()
            out.append((in_sink, in_dlq))
    return out


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def settle(data: Path, tenant: str, lines: list[SentLine], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = outcomes(data, tenant, lines)
        if all(s + d >= 1 for s, d in got) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for (line, eid), (in_sink, in_dlq) in zip(lines, got, strict=True):
        assert in_sink + in_dlq == 1, (
            f"line {line[:200]!r} (entity {eid!r}): {in_sink} in the sink, {in_dlq} in the DLQ")


def drop(data: Path, tenant: str, name: str, lines: list[SentLine]) -> Path:
    folder = data / "inbox" / tenant
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(b"".join(line + b"\n" for line, _ in lines))
    target = folder / name
    tmp.rename(target)
    return target


def canary(svc: ServiceProcess, data: Path, tenant: str) -> None:
    eid = f"canary-{uuid.uuid4().hex}"
    body = {"schema_version": 3, "tenant_id": tenant, "entity_type": "order", "entity_id": eid,
            "revision": 1, "occurred_at": "2025-01-01T00:00:00Z", "attributes": {}}
    assert svc.post_webhook(tenant, "canary", json=body).status_code == 202
    settle(data, tenant, [(orjson.dumps(body), eid)], timeout=30)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_records_and_files_end_once_and_sources_keep_moving(
        svc: ServiceProcess, data: st.DataObject) -> None:
    n = next(COUNTER)
    uid = f"{RUN}{n}"
    tenant = data.draw(st.sampled_from(TENANTS), label="tenant")
    web = [render(item, f"{uid}w{i}-") for i, item in enumerate(data.draw(
        st.lists(hostile_records(tenant), min_size=1, max_size=12), label="webhook lines"))]
    in_file = [render(item, f"{uid}f{i}-") for i, item in enumerate(data.draw(
        st.lists(hostile_records(tenant), min_size=1, max_size=12), label="file lines"))]
    name = f"{n}-{data.draw(FILE_NAMES, label='file name')}"
    base = svc.data_dir

    r = svc.post_webhook(tenant, "fuzz", b"\n".join(line for line, _ in web),
                         content_type="application/x-ndjson")
    assert r.status_code in (202, 400), r.text  # 400: no line of the body is JSON at all
    assert r.headers["content-type"].startswith("application/json")
    accepted = web if r.status_code == 202 else []
    path = drop(base, tenant, name, in_file)

    settle(base, tenant, accepted + in_file)
    deadline = time.monotonic() + 30
    while path.exists():  # the file is done (moved) once its last batch committed
        assert time.monotonic() < deadline, f"{path.name} never finished"
        time.sleep(0.2)
    canary(svc, base, tenant)
    health = svc.health()
    for name_, adapter in health["adapters"].items():
        assert not adapter["stalled"], (name_, adapter)
        assert adapter["progress"]["restarts"] == 0, (name_, adapter)
    assert health["status"] != "unhealthy", health["problems"]


def test_after_the_fuzz_every_source_still_moves(svc: ServiceProcess) -> None:
    """Runs after the property (file order): a fresh file and a webhook both get through."""
    base = svc.data_dir
    eid = f"last-{uuid.uuid4().hex}"
    body = orjson.dumps({"schema_version": 3, "tenant_id": TENANTS[0], "entity_type": "order",
                         "entity_id": eid, "revision": 1,
                         "occurred_at": "2025-01-01T00:00:00Z", "attributes": {}})
    drop(base, TENANTS[0], "last.jsonl", [(body, eid)])
    settle(base, TENANTS[0], [(body, eid)], timeout=30)
    canary(svc, base, TENANTS[1])
    health = svc.health()
    assert health["status"] in ("ok", "degraded"), health["problems"]
    assert not any(a["stalled"] for a in health["adapters"].values())
