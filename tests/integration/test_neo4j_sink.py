"""Neo4jSink against a real Neo4j 5.26 (scripts/services/neo4j.sh)."""

from __future__ import annotations

import asyncio
import random
import socket
import uuid

import pytest
from neo4j import AsyncDriver

from ingest.errors import SinkError
from ingest.pipeline.retry import Retryable, RetryPolicy, retry_call
from ingest.records import ReasonCode, SinkStatus
from ingest.sinks.neo4j import Neo4jSink

from ._fixtures_graph import make_record, neo4j_coords, neo4j_driver, neo4j_sink, tenant

__all__ = ["neo4j_coords", "neo4j_driver", "neo4j_sink", "tenant"]

pytestmark = pytest.mark.integration

APPLIED, UNCHANGED, FAILED = SinkStatus.APPLIED, SinkStatus.UNCHANGED, SinkStatus.FAILED


async def _entity_nodes(driver: AsyncDriver, tenant: str) -> int:
    recs, _, _ = await driver.execute_query(
        "MATCH (n:Entity {tenant: $t}) RETURN count(n) AS c", t=tenant
    )
    return int(recs[0]["c"])


async def test_start_creates_key_constraints(
    neo4j_sink: Neo4jSink, neo4j_driver: AsyncDriver
) -> None:
    recs, _, _ = await neo4j_driver.execute_query(
        "SHOW CONSTRAINTS YIELD name, labelsOrTypes, properties"
    )
    found = {(tuple(r["labelsOrTypes"]), tuple(r["properties"])) for r in recs}
    key = ("tenant", "entity_type", "entity_id")
    assert (("Entity",), key) in found and (("Tombstone",), key) in found
    await neo4j_sink.start()  # idempotent: a second start (another worker) does not fail


async def test_props_relations_and_stubs(neo4j_sink: Neo4jSink, tenant: str) -> None:
    rec = make_record(
        tenant,
        "customer",
        "c1",
        1,
        attributes={
            "name": "Ada",
            "score": 7,
            "vip": True,
            "tags": ["a", "b"],
            "address": {"city": "Oslo"},
            "huge": 2**63 + 5,
            "missing": None,
        },
        relations=[
            ("OWNS", "account", "a1"),
            ("KNOWS", "customer", "c2"),
            ("OWNS", "account", "a1"),
        ],
    )  # each relation type is its own (dynamic types were evaluated once per query in 5.26.0)
    assert [r.status for r in await neo4j_sink.write([rec])] == [APPLIED]
    got = await neo4j_sink.fetch(tenant, "customer", "c1")
    assert got is not None
    assert (got["name"], got["score"], got["vip"], got["revision"]) == ("Ada", 7, True, 1)
    assert got["tags"] == '["a","b"]' and got["address"] == '{"city":"Oslo"}'
    assert got["huge"] == str(2**63 + 5) and "missing" not in got
    assert got["occurred_at"] == "2025-01-01T00:00:01Z"
    assert got["relationships"] == [
        {"type": "KNOWS", "target_type": "customer", "target_id": "c2"},
        {"type": "OWNS", "target_type": "account", "target_id": "a1"},
    ]
    stub = await neo4j_sink.fetch(tenant, "account", "a1")
    assert stub is not None and "revision" not in stub and stub["relationships"] == []
    assert await neo4j_sink.count_nodes(tenant) == 1  # stubs are not entities written


async def test_revision_rule_in_batch_and_against_store(neo4j_sink: Neo4jSink, tenant: str) -> None:
    def r(rev: int, eid: str = "e1", name: str = "v") -> object:
        return make_record(tenant, "customer", eid, rev, attributes={"name": f"{name}{rev}"})

    res = await neo4j_sink.write([r(2), r(1), r(2), r(3), r(5, "e2")])  # type: ignore[list-item]
    assert [x.status for x in res] == [APPLIED, FAILED, UNCHANGED, APPLIED, APPLIED]
    assert res[1].reason is ReasonCode.OLDER_REVISION
    got = await neo4j_sink.fetch(tenant, "customer", "e1")
    assert got is not None and (got["revision"], got["name"]) == (3, "v3")

    # Not an exact copy of the stored r(3): with older records beside it, that would be taken
    # for a replay of the first batch (judged against the revision stored before it).
    res = await neo4j_sink.write([r(2), r(3, name="w"), r(4, "e2")])  # type: ignore[list-item]
    assert [x.status for x in res] == [FAILED, UNCHANGED, FAILED]
    assert res[0].reason is ReasonCode.OLDER_REVISION
    assert res[0].detail is not None and res[0].detail["stored_revision"] == 3
    got2 = await neo4j_sink.fetch(tenant, "customer", "e2")
    assert got2 is not None and got2["name"] == "v5"


async def test_newer_revision_replaces_relationships_older_leaves_them(
    neo4j_sink: Neo4jSink, tenant: str
) -> None:
    def rel(rev: int, *targets: str) -> object:
        return make_record(
            tenant, "customer", "c1", rev, relations=[("OWNS", "account", t) for t in targets]
        )

    await neo4j_sink.write([rel(1, "a1", "a2")])  # type: ignore[list-item]
    await neo4j_sink.write([rel(3, "a3")])  # type: ignore[list-item]
    res = await neo4j_sink.write([rel(2, "a9")])  # type: ignore[list-item]
    assert res[0].reason is ReasonCode.OLDER_REVISION
    got = await neo4j_sink.fetch(tenant, "customer", "c1")
    assert got is not None
    assert [x["target_id"] for x in got["relationships"]] == ["a3"]
    assert await neo4j_sink.fetch(tenant, "account", "a9") is None  # refused: no stub either


async def test_tombstone_blocks_older_and_yields_to_newer(
    neo4j_sink: Neo4jSink, neo4j_driver: AsyncDriver, tenant: str
) -> None:
    live = make_record(tenant, "customer", "c1", 1, relations=[("OWNS", "account", "a1")])
    other = make_record(tenant, "customer", "c2", 1, relations=[("KNOWS", "customer", "c1")])
    await neo4j_sink.write([live, other])
    res = await neo4j_sink.write([make_record(tenant, "customer", "c1", 2, deleted=True)])
    assert res[0].status is APPLIED
    assert await neo4j_sink.tombstone_revision(tenant, "customer", "c1") == 2
    stub = await neo4j_sink.fetch(tenant, "customer", "c1")  # c2 still points at it: a stub
    assert stub is not None and "revision" not in stub and stub["relationships"] == []
    assert await neo4j_sink.count_nodes(tenant) == 1
    c2 = await neo4j_sink.fetch(tenant, "customer", "c2")
    assert c2 is not None and [r["target_id"] for r in c2["relationships"]] == ["c1"]
    await neo4j_sink.write([make_record(tenant, "customer", "c2", 2)])  # c2 drops the edge
    await neo4j_sink.write([make_record(tenant, "customer", "c1", 2, deleted=True)])  # repeat
    gone = make_record(tenant, "customer", "c9", 1)
    await neo4j_sink.write([gone, make_record(tenant, "customer", "c9", 2, deleted=True)])
    assert await neo4j_sink.fetch(tenant, "customer", "c9") is None  # unreferenced: deleted

    before = await _entity_nodes(neo4j_driver, tenant)
    late = make_record(tenant, "customer", "c1", 1, attributes={"name": "zombie"})
    resent = make_record(tenant, "customer", "c1", 2, {"n": 1}, deleted=True)  # not a replay
    res = await neo4j_sink.write([late, resent])
    assert res[0].reason is ReasonCode.OLDER_REVISION and res[1].status is UNCHANGED
    still = await neo4j_sink.fetch(tenant, "customer", "c1")
    assert still is None or ("revision" not in still and "name" not in still)
    assert await _entity_nodes(neo4j_driver, tenant) == before  # no empty node left behind

    res = await neo4j_sink.write([make_record(tenant, "customer", "c1", 3, {"name": "back"})])
    assert res[0].status is APPLIED
    got = await neo4j_sink.fetch(tenant, "customer", "c1")
    assert got is not None and got["name"] == "back"
    assert await neo4j_sink.tombstone_revision(tenant, "customer", "c1") is None


async def test_concurrent_writers_converge_on_highest_revision(
    neo4j_coords: dict[str, str], neo4j_sink: Neo4jSink, tenant: str
) -> None:
    """Two sink instances, eight tasks, interleaved revisions (some tombstones) of 20 ids."""
    other = Neo4jSink("neo4j-other", **neo4j_coords)
    await other.start()
    ids = [f"e{i}" for i in range(20)]
    rng = random.Random(7)
    revs = {eid: list(range(1, 31)) for eid in ids}
    batches: list[list[object]] = [[] for _ in range(8)]
    for eid, rs in revs.items():
        for rev in rs:
            rec = make_record(
                tenant,
                "customer",
                eid,
                rev,
                {"name": f"{eid}-{rev}"},
                relations=[("KNOWS", "customer", rng.choice(ids))],
                deleted=rev % 7 == 0,
            )
            batches[rng.randrange(8)].append(rec)
    for b in batches:
        rng.shuffle(b)

    conflicts = 0

    def conflict(exc: Exception) -> Retryable | None:
        """The sink classifies deadlocks and MERGE races as conflicts and never retries them
        itself; the pipeline's one retry layer does, as here."""
        nonlocal conflicts
        if isinstance(exc, SinkError) and exc.conflict:
            conflicts += 1
            return Retryable(exc.reason)
        return None

    async def run(i: int) -> list[SinkStatus]:
        sink = neo4j_sink if i % 2 else other
        out: list[SinkStatus] = []
        chunk = batches[i]
        for k in range(0, len(chunk), 25):
            part = chunk[k : k + 25]
            written = await retry_call(
                lambda s=sink, p=part: s.write(p),  # type: ignore[misc]
                RetryPolicy(max_attempts=20, base_delay=0.02, max_delay=0.5),
                classify=conflict,
            )
            for res in written:
                assert res.status is not FAILED or res.reason is ReasonCode.OLDER_REVISION, res
                out.append(res.status)
        return out

    try:
        results = await asyncio.gather(*(run(i) for i in range(8)))
    finally:
        await other.close()
    assert sum(len(r) for r in results) == 20 * 30
    for eid in ids:
        got = await neo4j_sink.fetch(tenant, "customer", eid)
        assert got is not None and got["revision"] == 30 and got["name"] == f"{eid}-30"
        assert len(got["relationships"]) == 1


async def test_constraint_violation_fails_only_that_row(
    neo4j_sink: Neo4jSink, neo4j_driver: AsyncDriver, tenant: str
) -> None:
    prop = f"u{uuid.uuid4().hex[:8]}"
    await neo4j_driver.execute_query(
        f"CREATE CONSTRAINT {prop} FOR (n:Entity) REQUIRE n.{prop} IS UNIQUE"
    )
    try:
        recs = [
            make_record(tenant, "customer", "c1", 1, {prop: "same"}),
            make_record(tenant, "customer", "c2", 1, {prop: "same"}),
            make_record(tenant, "customer", "c3", 1, {prop: "other"}),
        ]
        res = await neo4j_sink.write(recs)
    finally:
        await neo4j_driver.execute_query(f"DROP CONSTRAINT {prop}")
    assert [r.status for r in res] == [APPLIED, FAILED, APPLIED]
    assert res[1].reason is ReasonCode.CONSTRAINT_VIOLATION
    assert res[1].detail is not None and res[1].detail["error_class"] == "ConstraintError"
    assert await neo4j_sink.fetch(tenant, "customer", "c2") is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_server_is_connection_error(tenant: str) -> None:
    sink = Neo4jSink("down", f"bolt://127.0.0.1:{_closed_port()}", "neo4j", "x")
    try:
        with pytest.raises(SinkError) as err:
            await sink.write([make_record(tenant, "customer", "c1", 1)])
        assert err.value.reason is ReasonCode.CONNECTION_ERROR
        assert (await sink.health())["connected"] is False
    finally:
        await sink.close()


async def test_wrong_password_is_connection_error(
    neo4j_coords: dict[str, str], tenant: str
) -> None:
    sink = Neo4jSink("badauth", neo4j_coords["uri"], neo4j_coords["user"], "wrong")
    try:
        with pytest.raises(SinkError) as err:
            await sink.write([make_record(tenant, "customer", "c1", 1)])
        assert err.value.reason is ReasonCode.CONNECTION_ERROR
        assert err.value.detail["error_class"] == "AuthError"
    finally:
        await sink.close()


async def test_replayed_batch_is_judged_like_its_first_pass(
    neo4j_sink: Neo4jSink, neo4j_driver: AsyncDriver, tenant: str
) -> None:
    """A crash between the sink write and the idempotency claim writes the batch again: the
    records it superseded must not turn into OLDER_REVISION the second time."""

    def r(rev: int, eid: str = "e1", **kw: object) -> object:
        return make_record(tenant, "customer", eid, rev, {"name": f"v{rev}"}, **kw)  # type: ignore[arg-type]

    batch = [r(2), r(7), r(3), r(4, "e2"), r(6, "e2", deleted=True), r(5, "e2")]
    first = await neo4j_sink.write(batch)  # type: ignore[arg-type]
    assert [x.status for x in first] == [APPLIED, APPLIED, FAILED, APPLIED, APPLIED, FAILED]
    again = await neo4j_sink.write(batch)  # type: ignore[arg-type]
    assert [x.status for x in again[:3]] in (
        [APPLIED, UNCHANGED, FAILED],
        [UNCHANGED, UNCHANGED, FAILED],
    )
    assert [x.reason for x in again] == [x.reason for x in first]
    assert again[1].status is UNCHANGED and again[4].status is UNCHANGED
    got = await neo4j_sink.fetch(tenant, "customer", "e1")
    assert got is not None and (got["revision"], got["name"]) == (7, "v7")
    assert got["_dedupe_key"] == batch[1].dedupe_key.hex()  # type: ignore[attr-defined]
    assert "_prev_revision" not in got  # nothing was stored before the first pass
    assert await neo4j_sink.tombstone_revision(tenant, "customer", "e2") == 6
    assert await neo4j_sink.fetch(tenant, "customer", "e2") is None

    # One record alone, repeated: UNCHANGED (equal revision), whatever is stored with it.
    assert [x.status for x in await neo4j_sink.write([r(7)])] == [UNCHANGED]  # type: ignore[list-item]
    assert [x.status for x in await neo4j_sink.write([r(7)])] == [UNCHANGED]  # type: ignore[list-item]
    # A later batch with other records is judged against revision 7, not as a replay.
    res = await neo4j_sink.write([r(6), r(9)])  # type: ignore[list-item]
    assert [x.status for x in res] == [FAILED, APPLIED]
    assert res[0].detail is not None and res[0].detail["stored_revision"] == 7
    got = await neo4j_sink.fetch(tenant, "customer", "e1")
    assert got is not None and (got["revision"], got["_prev_revision"]) == (9, 7)


async def test_replay_fields_are_not_attributes_and_may_be_missing(
    neo4j_sink: Neo4jSink, neo4j_driver: AsyncDriver, tenant: str
) -> None:
    rec = make_record(tenant, "customer", "c1", 3, {"_dedupe_key": "zz", "_prev_revision": 99})
    assert [x.status for x in await neo4j_sink.write([rec])] == [APPLIED]
    got = await neo4j_sink.fetch(tenant, "customer", "c1")
    assert got is not None and got["_dedupe_key"] == rec.dedupe_key.hex()
    assert "_prev_revision" not in got
    # A node written before replay support has neither field: judged on its revision alone.
    await neo4j_driver.execute_query(
        "MATCH (n:Entity {tenant: $t}) REMOVE n._dedupe_key, n._prev_revision", t=tenant
    )
    res = await neo4j_sink.write(
        [make_record(tenant, "customer", "c1", 2), make_record(tenant, "customer", "c1", 3)]
    )
    assert [x.status for x in res] == [FAILED, UNCHANGED]
    assert res[0].reason is ReasonCode.OLDER_REVISION
