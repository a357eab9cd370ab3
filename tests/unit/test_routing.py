"""Routing: `Config.sinks_for` answers as the routes say, first match wins, remembered per pair."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import _ROUTES_KEPT, Config, Route, parse_config

SINKS = [{"type": "sqlite", "name": n} for n in ("a", "b", "c")]
names = st.sampled_from(["t1", "t2", "order", "user"])
routes = st.lists(
    st.fixed_dictionaries(
        {
            "tenant": st.sampled_from(["*", "t1", "t2"]),
            "entity_type": st.sampled_from(["*", "order", "user"]),
            "sinks": st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3),
        }
    ),
    max_size=4,
)


def first_match(config: Config, tenant: str, entity_type: str) -> list[str]:
    for r in config.routes:
        if r.tenant in ("*", tenant) and r.entity_type in ("*", entity_type):
            return list(r.sinks)
    return [s.name for s in config.sinks]


@settings(max_examples=100)
@given(routes, st.lists(st.tuples(names, names), max_size=20))
def test_remembered_answers_are_the_first_matching_route(
    table: list[dict[str, object]], asks: list[tuple[str, str]]
) -> None:
    config = parse_config({"sinks": SINKS, "routes": table})
    for tenant, entity_type in asks * 2:  # each pair asked again: from the memo
        assert config.sinks_for(tenant, entity_type) == first_match(config, tenant, entity_type)


def test_a_copy_with_other_routes_does_not_answer_from_the_old_memo() -> None:
    config = parse_config({"sinks": SINKS, "routes": [{"tenant": "t1", "sinks": ["a"]}]})
    assert config.sinks_for("t1", "order") == ["a"]
    assert config.sinks_for("t2", "order") == ["a", "b", "c"]
    for deep in (False, True):
        other = config.model_copy(update={"routes": [Route(tenant="t2", sinks=["b"])]}, deep=deep)
        assert other.sinks_for("t1", "order") == ["a", "b", "c"]
        assert other.sinks_for("t2", "order") == ["b"]
    assert copy.copy(config).route_memo == {} and copy.deepcopy(config).route_memo == {}
    assert config.sinks_for("t1", "order") == ["a"]  # the original kept its own
    assert "route_memo" not in config.model_dump()


def test_the_memo_is_bounded() -> None:
    config = parse_config({"sinks": SINKS})
    for i in range(_ROUTES_KEPT * 2 + 1):
        assert config.sinks_for(f"t{i}", "order") == ["a", "b", "c"]
        assert len(config.route_memo) <= _ROUTES_KEPT
