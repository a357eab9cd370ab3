"""JSON logs: one parseable object per line, carrying the tenant, source, batch and record the
line is about, from the context of the task that writes it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from types import SimpleNamespace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ingest import logctx
from ingest.cli.common import setup_logging
from ingest.records import RawRecord, Record


def raw(tenant: str, seq: int, source: str = "inbox") -> RawRecord:
    return RawRecord(b"{}", tenant, source, seq, None, 0.0)


def batch(*tenants: str, first: int = 10) -> Any:
    records = [raw(t, first + i) for i, t in enumerate(tenants)]
    return SimpleNamespace(records=records, first_seq=first, last_seq=first + len(records) - 1)


def line(message: str = "m", *args: Any, exc: bool = False, **kw: Any) -> dict[str, Any]:
    rec = logging.LogRecord("ingest.x", logging.WARNING, __file__, 1, message, args, None)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            rec.exc_info = sys.exc_info()
    for k, v in kw.items():
        setattr(rec, k, v)
    text = logctx.JsonFormatter().format(rec)
    assert "\n" not in text
    doc: dict[str, Any] = json.loads(text)
    return doc


def test_a_line_outside_any_work_has_no_context() -> None:
    doc = line("hello %s", "world")
    assert doc["message"] == "hello world" and doc["level"] == "WARNING"
    assert doc["logger"] == "ingest.x" and doc["ts"].endswith("Z")
    assert not {"tenant", "source", "batch", "record"} & doc.keys()


def test_each_task_logs_its_own_source_and_batch() -> None:
    async def work(source: str, b: Any) -> dict[str, Any]:
        logctx.source.set(source)
        logctx.batch.set(b)
        await asyncio.sleep(0)  # interleave the two tasks
        inner = asyncio.ensure_future(asyncio.sleep(0, result=None))  # a child task
        await inner
        return line("committed")

    async def both() -> list[dict[str, Any]]:
        return list(
            await asyncio.gather(
                work("inbox", batch("acme", "acme", first=1)),
                work("webhook", batch("globex", first=7)),
            )
        )

    a, b = asyncio.run(both())
    assert (a["tenant"], a["source"], a["batch"]) == ("acme", "inbox", "1-2")
    assert (b["tenant"], b["source"], b["batch"]) == ("globex", "webhook", "7-7")
    assert "source" not in line("after")  # nothing leaks out of the tasks


def test_a_batch_of_several_tenants_names_none() -> None:
    async def go() -> dict[str, Any]:
        logctx.batch.set(batch("acme", "globex"))
        return line("x")

    doc = asyncio.run(go())
    assert "tenant" not in doc and doc["batch"] == "10-11"


def test_a_line_about_one_record_names_it() -> None:
    r = raw("acme", 42, source="shop")
    doc = line("isolated", ingest_record=r)
    assert (doc["tenant"], doc["source"], doc["record"]) == ("acme", "shop", "seq:42")
    body = {"tenant_id": "acme", "entity_type": "order", "entity_id": "o-1", "revision": 3}
    decoded = Record.of(r, body, b"\0" * 32)
    assert line("x", **logctx.about(decoded))["record"] == "order/o-1@3"


def test_the_traceback_travels_in_the_line() -> None:
    doc = line("failed", exc=True)
    assert "ValueError: boom" in doc["exc"]


ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()))  # lone surrogates too


@given(ANY_TEXT, ANY_TEXT.filter(bool))
def test_any_message_and_tenant_make_one_json_line(message: str, tenant: str) -> None:
    async def go() -> dict[str, Any]:
        logctx.batch.set(batch(tenant))
        return line("%s", message)

    doc = asyncio.run(go())
    assert doc["message"] == message and doc["tenant"] == tenant  # surrogates round-trip


def test_setup_logging_json_writes_json_to_stderr(monkeypatch: Any) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    try:
        setup_logging("INFO", "json")
        logging.getLogger("ingest.t").info("ready %d", 1)
    finally:
        root.handlers, _ = saved
        root.setLevel(saved[1])
    assert json.loads(err.getvalue())["message"] == "ready 1"
