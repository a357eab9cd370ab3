"""TypesenseSink against a real typesense-server 0.24.1 (scripts/services/typesense.sh), beyond the
sink contract (test_sink_contract.py): collections and documents, backtick ids (generated),
replay fields, a stopped server's data, a wrong key, 429s and their Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typesense.exceptions import ServiceUnavailable, TypesenseClientError

from ingest.config import parse_config
from ingest.errors import SinkError
from ingest.metrics import Metrics
from ingest.pipeline.admission import Admission
from ingest.pipeline.breaker import CircuitBreaker
from ingest.pipeline.retry import RetryPolicy
from ingest.pipeline.worker import Pipeline, SinkLane
from ingest.records import ReasonCode, SinkStatus
from ingest.sinks.typesense import TypesenseSink, _classify, collection_name
from ingest.state.sqlite import SQLiteDB, SQLiteDLQStore, SQLiteDroppedStore
from ingest.state.sqlite_idem import SQLiteIdempotencyStore

from ._fixtures_graph import TS_FIELDS, make_record, require_env, typesense_admin

pytestmark = pytest.mark.integration

APPLIED, UNCHANGED, FAILED = SinkStatus.APPLIED, SinkStatus.UNCHANGED, SinkStatus.FAILED


def test_collection_names_are_plain_and_never_clash() -> None:
    assert collection_name("acme", "customer") == "acme__customer"
    odd = {collection_name("a__b", "c"), collection_name("a", "b__c"), collection_name("a/b", "c")}
    assert len(odd) == 3 and all(n.count("__") == 1 for n in odd)


async def test_collection_created_with_config_and_fixed_fields(
    typesense_sink: TypesenseSink, typesense_coords: dict[str, str], tenant: str
) -> None:
    rec = make_record(tenant, "customer", "c1", 1, {"name": "Ada", "city": "Oslo", "score": 3})
    assert [r.status for r in await typesense_sink.write([rec])] == [APPLIED]
    schema = typesense_admin(typesense_coords).collections[f"{tenant}__customer"].retrieve()
    types = {f["name"]: f["type"] for f in schema["fields"]}
    assert types == {
        "entity_id": "string",
        "revision": "int64",
        "deleted": "bool",
        "occurred_at": "string",
        "name": "string",
        "city": "string",
        "score": "int64",
    }
    got = await typesense_sink.fetch(tenant, "customer", "c1")
    assert got is not None
    assert (got["id"], got["name"], got["score"], got["revision"], got["deleted"]) == (
        "c1",
        "Ada",
        3,
        1,
        False,
    )
    hits = (
        typesense_admin(typesense_coords)
        .collections[f"{tenant}__customer"]
        .documents.search({"q": "Ada", "query_by": "name"})
    )
    assert hits["found"] == 1  # the configured field is really searchable


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.text(min_size=1, max_size=5), st.sampled_from("/?#% \x00\x7f"), st.integers(0, 4))
def test_ids_with_a_backtick_are_read_one_by_one_whatever_else_they_hold(
    typesense_coords: dict[str, str], tenant: str, text: str, odd: str, at: int
) -> None:
    """filter_by (0.24) cannot quote a backtick: such ids take the per-document read, whose
    path must carry the id exactly (a `/`, `?`, `#`, `%` or control character read another
    document, or none, and an older revision overwrote a newer one). Generated ids."""
    entity_id = uuid.uuid4().hex[:6] + text[:at] + "`" + odd + text[at:]  # new per example

    async def go() -> None:
        sink = TypesenseSink("ts", fields=TS_FIELDS, **typesense_coords)
        try:
            await sink.write([make_record(tenant, "customer", entity_id, 5)])
            res = await sink.write(
                [make_record(tenant, "customer", entity_id, 4),
                 make_record(tenant, "customer", entity_id, 6)]
            )  # fmt: skip
            assert [x.status for x in res] == [FAILED, APPLIED], entity_id
            assert res[0].detail is not None and res[0].detail["stored_revision"] == 5
            got = await sink.fetch(tenant, "customer", entity_id)
            assert got is not None and got["revision"] == 6 and got["_prev_revision"] == 5
        finally:
            await sink.close()
            with contextlib.suppress(Exception):  # the test's tenant: one collection
                typesense_admin(typesense_coords).collections[f"{tenant}__customer"].delete()

    asyncio.run(go())


async def test_a_tombstone_is_a_document_without_content(
    typesense_sink: TypesenseSink, tenant: str
) -> None:
    await typesense_sink.write([make_record(tenant, "customer", "c1", 1, {"name": "Ada"})])
    await typesense_sink.write([make_record(tenant, "customer", "c1", 2, deleted=True)])
    tomb = await typesense_sink.fetch(tenant, "customer", "c1")
    assert tomb is not None and tomb["deleted"] is True and tomb["revision"] == 2
    assert "name" not in tomb  # no content left to find
    assert await typesense_sink.count(tenant, "customer") == 0


async def test_a_rejected_document_is_in_its_failure(
    typesense_sink: TypesenseSink, tenant: str
) -> None:
    recs = [make_record(tenant, "customer", "c2", 1, {"score": "not a number"})]
    [res] = await typesense_sink.write(recs)
    assert res.reason is ReasonCode.CONSTRAINT_VIOLATION and res.detail is not None
    assert "score" in res.detail["message"] and '"not a number"' in res.detail["document"]
    assert res.detail["collection"] == f"{tenant}__customer"


async def test_stopped_server_is_connection_error_and_data_survives_restart(
    typesense_sink: TypesenseSink, tenant: str
) -> None:
    script = require_env("INGEST_TEST_TYPESENSE_SCRIPT", "typesense")
    await typesense_sink.write([make_record(tenant, "customer", "c1", 1, {"name": "Ada"})])
    await asyncio.to_thread(subprocess.run, [script, "stop-server"], check=True)
    try:
        with pytest.raises(SinkError) as err:
            await typesense_sink.write([make_record(tenant, "customer", "c1", 2, {"name": "B"})])
        assert err.value.reason is ReasonCode.CONNECTION_ERROR
        assert (await typesense_sink.health())["connected"] is False
    finally:
        await asyncio.to_thread(subprocess.run, [script, "start-server"], check=True)
    res = await typesense_sink.write([make_record(tenant, "customer", "c1", 2, {"name": "B"})])
    assert res[0].status is APPLIED  # same sink instance recovers; revision 1 was kept
    res = await typesense_sink.write([make_record(tenant, "customer", "c1", 1, {"name": "A"})])
    assert res[0].reason is ReasonCode.OLDER_REVISION


async def test_wrong_api_key_is_connection_error(
    typesense_coords: dict[str, str], tenant: str
) -> None:
    sink = TypesenseSink("badkey", typesense_coords["url"], "wrong", fields=TS_FIELDS)
    try:
        with pytest.raises(SinkError) as err:
            await sink.write([make_record(tenant, "customer", "c1", 1)])
        assert err.value.reason is ReasonCode.CONNECTION_ERROR
        assert err.value.detail["status"] == 401
    finally:
        await sink.close()


def test_status_mapping_for_codes_this_server_cannot_produce() -> None:
    """0.24.1 has no rate limiter and answers 503 only while loading: the mapping of those
    statuses (as the official client raises them) is checked directly."""
    assert _classify(TypesenseClientError(429, "slow down"), "x").reason is ReasonCode.RATE_LIMITED
    assert _classify(ServiceUnavailable(503, "lagging"), "x").reason is ReasonCode.SINK_TIMEOUT


async def test_each_document_keeps_its_replay_fields(
    typesense_sink: TypesenseSink, tenant: str
) -> None:
    """What `judge_batch` reads to recognise a replay (the judgements: the contract)."""
    first = make_record(tenant, "customer", "e1", 7)
    second = make_record(tenant, "customer", "e1", 9)
    await typesense_sink.write([first])
    got = await typesense_sink.fetch(tenant, "customer", "e1")
    assert got is not None and got["_dedupe_key"] == first.dedupe_key.hex()
    assert "_prev_revision" not in got  # nothing was stored before
    await typesense_sink.write([second])
    got = await typesense_sink.fetch(tenant, "customer", "e1")
    assert got is not None and got["_dedupe_key"] == second.dedupe_key.hex()
    assert got["_prev_revision"] == 7


async def test_documents_without_replay_fields_still_work(
    typesense_sink: TypesenseSink, typesense_coords: dict[str, str], tenant: str
) -> None:
    """Collections and documents written before the replay fields existed."""
    rec = make_record(tenant, "customer", "c1", 3, {"_dedupe_key": "zz", "_prev_revision": "x"})
    assert [x.status for x in await typesense_sink.write([rec])] == [APPLIED]
    got = await typesense_sink.fetch(tenant, "customer", "c1")
    assert got is not None and got["_dedupe_key"] == rec.dedupe_key.hex()
    assert "_prev_revision" not in got  # attributes cannot set the replay fields
    # As a sink from before the replay fields wrote it:
    old = {"id": "c1", "entity_id": "c1", "revision": 3, "deleted": False, "name": "old"}
    admin = typesense_admin(typesense_coords)
    admin.collections[f"{tenant}__customer"].documents.upsert(old)  # type: ignore[arg-type]
    fresh = TypesenseSink(
        "typesense-fresh", typesense_coords["url"], typesense_coords["api_key"], TS_FIELDS
    )
    try:  # a new process: the existing collection is checked, not altered
        res = await fresh.write(
            [make_record(tenant, "customer", "c1", 2), make_record(tenant, "customer", "c1", 3)]
        )
    finally:
        await fresh.close()
    assert [x.status for x in res] == [FAILED, UNCHANGED]
    assert res[0].reason is ReasonCode.OLDER_REVISION


class TooManyRequestsProxy:
    """A TCP proxy in front of the real server that answers the first `refuse` document
    imports itself with 429 + `Retry-After` (0.24.1 has no rate limiter of its own), and
    forwards everything else untouched."""

    def __init__(self, target: str, refuse: int, retry_after: str) -> None:
        self.host, port = target.removeprefix("http://").split(":")
        self.port_up = int(port)
        self.refuse = refuse
        self.retry_after = retry_after
        self.refused = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Request by request (HTTP/1.1 without pipelining: a request is sent only once the
        answer to the one before was read), so a kept-alive connection is still inspected."""
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port_up)

        async def answers() -> None:
            with contextlib.suppress(OSError):
                while chunk := await up_reader.read(65536):
                    writer.write(chunk)
                    await writer.drain()

        relay = asyncio.create_task(answers())
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, OSError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                if b"/documents/import" in head.split(b"\r\n", 1)[0] and (
                    self.refused < self.refuse
                ):
                    self.refused += 1
                    msg = b'{"message": "Rate limit exceeded"}'
                    writer.write(
                        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: "
                        + self.retry_after.encode()
                        + b"\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(msg)).encode() + b"\r\n\r\n" + msg
                    )
                    await writer.drain()
                    continue
                up_writer.write(head + body)
                await up_writer.drain()
        finally:
            relay.cancel()
            up_writer.close()
            writer.close()


async def test_429_passes_the_servers_retry_after_on(
    typesense_coords: dict[str, str], tenant: str
) -> None:
    async with TooManyRequestsProxy(typesense_coords["url"], 1, "3") as url:
        sink = TypesenseSink("limited", url, typesense_coords["api_key"], fields=TS_FIELDS)
        try:
            with pytest.raises(SinkError) as err:
                await sink.write([make_record(tenant, "customer", "c1", 1)])
            assert err.value.reason is ReasonCode.RATE_LIMITED
            assert err.value.detail["retry_after_seconds"] == 3.0
            res = await sink.write([make_record(tenant, "customer", "c1", 1)])  # allowed now
            assert [r.status for r in res] == [APPLIED]
        finally:
            await sink.close()


async def test_the_worker_waits_the_retry_after_of_a_429(
    typesense_coords: dict[str, str], tenant: str, tmp_path: Path
) -> None:
    """Through the pipeline's one retry layer: the second attempt comes after the server's
    4 s, not after the policy's 0.2 s backoff, and the record lands."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async with TooManyRequestsProxy(typesense_coords["url"], 1, "4") as url:
        sink = TypesenseSink("limited", url, typesense_coords["api_key"], fields=TS_FIELDS)
        db = await SQLiteDB.open(tmp_path / "state.db")
        try:
            config = parse_config({"sinks": [{"type": "sqlite", "name": "limited"}]})
            pipe = Pipeline(
                config=config,
                admission=Admission(config.admission, config.limits_for),
                idempotency=SQLiteIdempotencyStore(db),
                dlq=SQLiteDLQStore(db),
                dropped=SQLiteDroppedStore(db),
                lanes={"limited": SinkLane(sink, CircuitBreaker("limited", 5, 30.0))},
                metrics=Metrics(),
                retry=RetryPolicy(base_delay=0.2, max_delay=0.2),
                sleep=sleep,
            )
            rec = make_record(tenant, "customer", "c9", 1, {"name": "Ada"})
            report = await pipe.deliver([rec.raw], [rec])
            assert report.delivered == 1 and report.dlq == 0
            assert slept == [4.0]
            assert (await sink.fetch(tenant, "customer", "c9") or {}).get("name") == "Ada"
        finally:
            await sink.close()
            await db.close()
