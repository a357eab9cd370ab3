"""The decoder the factory builds carries each record's body where a sink of its route reads
it (Typesense, Neo4j), and leaves it out where none does (SQLite, Postgres): left out, a body
is rebuilt from the bytes on first read at about twice the cost of building it at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from ingest.config import Config
from ingest.factory import bodies_for, build_core
from ingest.records import RawRecord, Record
from tests.unit.test_decode import good

pytest.importorskip("ingest_native", reason="the compiled extension is not built")

SQLITE = {"type": "sqlite", "name": "lite"}
POSTGRES = {"type": "postgres", "name": "pg", "dsn": "postgresql://unused/"}
TYPESENSE = {"type": "typesense", "name": "ts", "api_key": "k"}
NEO4J = {"type": "neo4j", "name": "graph"}
FLAT = {"amount": 1.5, "currency": "EUR"}  # an email's format is Python's to check


def config(tmp_path: Path, sinks: list[dict[str, Any]], routes: Any = ()) -> Config:
    return Config.model_validate(
        {"data_dir": str(tmp_path), "sinks": sinks, "routes": list(routes)}
    )


async def built_bodies(cfg: Config) -> dict[tuple[str, str], bool]:
    """Whether the factory's decoder built each (tenant, entity_type)'s bodies at once."""
    core = await build_core(cfg)
    try:
        pairs = [(t, e) for t in ("acme", "globex") for e in ("order", "invoice")]
        bodies = [good(tenant_id=t, entity_type=e, entity_id=e, attributes=FLAT) for t, e in pairs]
        raws = [RawRecord(orjson.dumps(b), b["tenant_id"], "test", 1, 1, 0.0) for b in bodies]
        got = [core.decoder.decode(raw) for raw in raws]
        assert all(type(r) is Record for r in got)  # finished by the compiled path
        assert core.decoder.path == "compiled"
        return {pair: rec._body is not None for pair, rec in zip(pairs, got, strict=True)}  # type: ignore[union-attr]
    finally:
        await core.close()


ALL = [("acme", "order"), ("acme", "invoice"), ("globex", "order"), ("globex", "invoice")]


@pytest.mark.parametrize(
    ("sinks", "eager"),
    [
        ([SQLITE], False),
        ([SQLITE, POSTGRES], False),
        ([TYPESENSE], True),
        ([NEO4J], True),
        ([SQLITE, TYPESENSE], True),
        ([POSTGRES, NEO4J], True),
    ],
)
async def test_every_route_reads_bodies_or_none_does(
    tmp_path: Path, sinks: list[dict[str, Any]], eager: bool
) -> None:
    cfg = config(tmp_path, sinks)
    assert bodies_for(cfg) is eager
    assert await built_bodies(cfg) == dict.fromkeys(ALL, eager)


async def test_bodies_follow_the_routes(tmp_path: Path) -> None:
    """Mixed routes: only the records routed to a body-reading sink carry their body; a
    pair no route names falls back to all sinks, as `Config.sinks_for` does."""
    routes = [
        {"tenant": "acme", "entity_type": "invoice", "sinks": ["ts"]},
        {"tenant": "acme", "sinks": ["lite"]},
        {"tenant": "globex", "entity_type": "order", "sinks": ["lite", "graph"]},
    ]
    cfg = config(tmp_path, [SQLITE, TYPESENSE, NEO4J], routes)
    assert callable(bodies_for(cfg))
    assert await built_bodies(cfg) == {
        ("acme", "order"): False,
        ("acme", "invoice"): True,
        ("globex", "order"): True,
        ("globex", "invoice"): True,  # no route: every sink
    }
    routes[-1] = {"sinks": ["lite"]}  # a catch-all route: no fallback to every sink
    cfg = config(tmp_path, [SQLITE, TYPESENSE, NEO4J], routes)
    assert await built_bodies(cfg) == {
        ("acme", "order"): False,
        ("acme", "invoice"): True,
        ("globex", "order"): False,
        ("globex", "invoice"): False,
    }


async def test_a_reading_sink_no_route_names_builds_no_body(tmp_path: Path) -> None:
    cfg = config(tmp_path, [SQLITE, TYPESENSE], [{"sinks": ["lite"]}])
    assert bodies_for(cfg) is False
    assert await built_bodies(cfg) == dict.fromkeys(ALL, False)
