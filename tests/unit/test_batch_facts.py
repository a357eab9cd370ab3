"""The decoder's `BatchFacts` and the worker's per-batch path that reads them.

The compiled decoder gathers a batch's dedupe keys, entity keys, whether a key comes twice
and the one tenant / entity type while it builds the records; `Pipeline.write`/`settle`,
`prefetch_seen` and the runner's conflict keys read those instead of walking the records.
The facts must be exactly what the walks find, and a batch delivered with them must end
exactly as without them: counts, DLQ entries, each record's result at each sink, claims,
processed counts and every metric sample.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.pipeline.decode import Decoder
from ingest.pipeline.runner import _conflict_keys
from ingest.pipeline.worker import Pipeline
from ingest.records import RawRecord, Record
from ingest.state.sqlite import SQLiteDB
from tests.unit.test_worker import FakeSleep, ScriptedSink, make_pipeline

COMPILED = Decoder()
pytestmark = pytest.mark.skipif(
    COMPILED.path != "compiled", reason="the compiled decoder (ingest_native) is not installed"
)
ROUTES = [
    {"tenant": "*", "entity_type": "order", "sinks": ["a", "b"]},
    {"tenant": "u", "entity_type": "user", "sinks": ["b"]},
]


def line(tenant: str, entity_type: str, eid: int, rev: int) -> bytes:
    return (
        b'{"schema_version":3,"tenant_id":"%s","entity_type":"%s","entity_id":"e%d",'
        b'"revision":%d,"occurred_at":"2025-01-01T00:00:00Z","attributes":{}}'
        % (tenant.encode(), entity_type.encode(), eid, rev)
    )


COPY = "copy"  # a source name "src" that is not the object "src" is (equal, not the same)


def raws_of(specs: list[Any]) -> list[RawRecord]:
    return [
        RawRecord(
            data=b"not json" if bad else line(t, kind, eid, rev),
            tenant=t, source="".join(["sr", "c"]) if src == COPY else src, seq=i, position=i,
            event_time=when,
        )
        for i, (t, src, kind, eid, rev, when, bad, *_) in enumerate(specs)
    ]


def decode(raws: list[RawRecord]) -> tuple[list[Any], Any]:
    COMPILED.decode_many(raws)  # the occurred_at seen once: the compiled path finishes them
    return COMPILED.decode_batch(raws)


STATUSES = ["applied", "applied", "applied", "unchanged", "failed"]


@st.composite
def record_specs(draw: st.DrawFn) -> list[Any]:
    """A batch: often of one tenant and source, often one whose records all apply (the
    per-batch path's cases), else anything (failures, sink outcomes, two tenants, sources).
    Sources and event times are sometimes equal without being the same object (COPY, -0.0),
    which the facts do not take for one."""
    one_label, all_apply = draw(st.booleans()), draw(st.booleans())
    tenants = ["t"] if one_label else ["t", "u"]
    sources = ["src", "src", "src", COPY] if one_label else ["src", "src", "rdr", COPY]
    statuses = ["applied"] if all_apply else STATUSES
    record = st.tuples(
        st.sampled_from(tenants),
        st.sampled_from(sources),
        st.sampled_from(["order", "order", "user"]),  # entity type
        st.integers(0, 4),  # entity id
        st.integers(1, 3),  # revision
        st.sampled_from([0.0, 0.0, 0.0, 5.0, -0.0]),  # event time
        st.just(False) if all_apply else st.sampled_from([False] * 9 + [True]),  # undecodable
        st.sampled_from(statuses),  # sink a
        st.sampled_from(statuses),  # sink b
        st.booleans(),  # claimed before
    )
    return draw(st.lists(record, min_size=1, max_size=14))


@settings(max_examples=200, deadline=None)
@given(record_specs())
def test_the_facts_are_what_the_walks_find(specs: list[Any]) -> None:
    raws = raws_of(specs)
    decoded, facts = decode(raws)
    if any(type(r) is not Record for r in decoded):
        assert facts is None
        return
    assert facts is not None  # every record finished by the compiled path
    keys = [r.dedupe_key for r in decoded]
    assert facts.keys == keys and facts.keys is not keys
    assert facts.entities == {r.entity_key for r in decoded}
    assert facts.unique == (len(set(keys)) == len(keys))
    tenants = {r.tenant for r in decoded}
    types = {r.entity_type for r in decoded}
    assert facts.tenant == (tenants.pop() if len(tenants) == 1 else None)
    assert facts.entity_type == (types.pop() if len(types) == 1 else None)
    for got, values in (
        (facts.source, [raw.source for raw in raws]),
        (facts.event_time, [raw.event_time for raw in raws]),
    ):
        assert got is (values[0] if all(v is values[0] for v in values) else None)
    assert _conflict_keys(raws, decoded, facts) == _conflict_keys(raws, decoded)


def samples(pipe: Pipeline) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    """Every metric sample but the creation times."""
    return sorted(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for m in pipe.metrics.registry.collect()
        for s in m.samples
        if not s.name.endswith("_created")
    )


async def deliver(tmp_path: Path, specs: list[Any], with_facts: bool) -> dict[str, Any]:
    database = await SQLiteDB.open(tmp_path / f"{uuid.uuid4().hex}.db")
    try:
        script_a = {f"e{eid}": a for (_, _, _, eid, _, _, _, a, _, _) in specs}
        script_b = {f"e{eid}": b for (_, _, _, eid, _, _, _, _, b, _) in specs}
        sinks = {"a": ScriptedSink("a", script_a), "b": ScriptedSink("b", script_b)}
        pipe = make_pipeline(database, sinks, FakeSleep(), routes=ROUTES)  # type: ignore[arg-type]
        pipe.clock = lambda: 1000.0
        raws = raws_of(specs)
        decoded, facts = decode(raws)
        before = [
            r.dedupe_key
            for r, spec in zip(decoded, specs, strict=True)
            if spec[-1] and type(r) is Record
        ]
        if before:
            await pipe.idempotency.claim(before)
        if not with_facts:
            facts = None
        lookup = pipe.prefetch_seen(decoded, raws, facts)
        if before:
            pipe._claims.add(before[::2])  # some claims made after the lookup was sent
        report = await pipe.deliver(raws, decoded, claimed_before=lookup, facts=facts)
        keys = [r.dedupe_key for r in decoded if type(r) is Record]
        return {
            "facts": facts is not None,
            "counts": (report.delivered, report.duplicate, report.dropped, report.dlq),
            "dlq": sorted(
                (e.dedupe_key, e.tenant, e.source, e.sink, e.reason.value, e.attempts,
                 e.entity_id, repr(sorted(e.detail.items())))
                for e in report.dlq_entries
            ),
            "results": {
                sink: [(r.entity_key, res.status.value) for r, res in zip(*sent, strict=True)]
                for sink, sent in report.sink_results.items()
            },
            "claimed": await pipe.idempotency.seen(keys) if keys else [],
            "recent": [k in (pipe._claims.since(0) or ()) for k in keys],
            "processed": [await pipe.dlq.processed_total(t) for t in ("t", "u")],
            "metrics": samples(pipe),
        }
    finally:
        await database.close()


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record_specs())
async def test_a_batch_ends_the_same_with_its_facts_and_without(
    tmp_path: Path, specs: list[Any]
) -> None:
    """Mixed batches: failures, duplicates in the batch and claimed before, two tenants,
    sources, entity types routed to different sinks, event times, sink failures."""
    fast = await deliver(tmp_path, specs, with_facts=True)
    slow = await deliver(tmp_path, specs, with_facts=False)
    assert fast.pop("facts") == (not any(spec[6] for spec in specs))
    assert not slow.pop("facts")
    assert fast == slow
