"""The factory's registries are the one list of sinks, sources and state kinds.

The config unions, the config error paths and docs/config.md must agree with them, so adding a
sink is its module, its config model and one registry entry: nothing else to keep in step.
"""

from __future__ import annotations

import typing
from typing import Any

import pytest

from ingest import config as C
from ingest.errors import ConfigError
from ingest.factory import SINKS, SOURCES, STORES
from ingest.tools.config_docs import render


def _members(union: Any) -> dict[str, type]:
    out: dict[str, type] = {}
    for model in typing.get_args(typing.get_args(union)[0]):
        tag = "kind" if "kind" in model.model_fields else "type"
        out[model.model_fields[tag].default] = model
    return out


@pytest.mark.parametrize(
    ("registry", "union"),
    [(SINKS, C.SinkConfig), (SOURCES, C.SourceConfig), (STORES, C.StateConfig)],
    ids=["sinks", "sources", "stores"],
)
def test_registry_and_config_union_name_the_same_models(registry: Any, union: Any) -> None:
    assert {k: v.model for k, v in registry.items()} == _members(union)


@pytest.mark.parametrize("kind", sorted(SINKS))
def test_every_sink_has_its_section_in_the_config_reference(kind: str) -> None:
    assert f"## sinks[] type: {kind}\n" in render()


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_every_source_has_its_section_in_the_config_reference(kind: str) -> None:
    assert f"## sources[] type: {kind}\n" in render()


@pytest.mark.parametrize(
    ("section", "kind"),
    [("sinks", k) for k in SINKS] + [("sources", k) for k in SOURCES],
)
def test_error_paths_never_show_the_type_tag(section: str, kind: str) -> None:
    """Any error in any source or sink is reported at the path the operator wrote (an unknown
    key, or the first required key missing), never with pydantic's union tag in it."""
    with pytest.raises(ConfigError) as err:
        C.parse_config({section: [{"type": kind, "no_such_key": 1}]})
    assert err.value.key.startswith(f"{section}[0].")
    assert kind not in err.value.key.split(".")[1:]


@pytest.mark.parametrize("kind", sorted(STORES))
def test_state_error_paths_never_show_the_kind_tag(kind: str) -> None:
    with pytest.raises(ConfigError) as err:
        C.parse_config({"state": {"kind": kind, "no_such_key": 1}})
    assert err.value.key.startswith("state.")
    assert kind not in err.value.key.split(".")
