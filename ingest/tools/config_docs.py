"""Generate docs/config.md from the config models, so the reference cannot drift from the code.

    uv run python -m ingest.tools.config_docs > docs/config.md
(tests/unit/test_config_docs.py fails when the checked-in page differs from this output.)
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ingest import config as C
from ingest.factory import SINKS, SOURCES, STORES


def _nested(model: type[BaseModel]) -> list[tuple[str, type[BaseModel]]]:
    """Models used inside a model's fields (e.g. Typesense's `fields` entries): (field, model)."""
    out: list[tuple[str, type[BaseModel]]] = []

    def walk(name: str, tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            out.append((name, tp))
        for arg in typing.get_args(tp):
            walk(name, arg)

    for name, field in model.model_fields.items():
        walk(name, field.annotation)
    return out


def sections() -> list[tuple[str, type[BaseModel]]]:
    """The page's sections; state, sources and sinks come from the factory's registries."""
    default_state = C.Config.model_fields["state"].default.kind
    out: list[tuple[str, type[BaseModel]]] = [
        ("top level", C.Config),
        ("http", C.HttpConfig),
        ("auth (or `auth: disabled`)", C.AuthConfig),
    ]
    for kind, store in STORES.items():
        default = ", the default" if kind == default_state else ""
        out.append((f"state (kind: {kind}{default})", store.model))
    out += [
        ("tenants.<tenant> and admission.default_limits", C.TenantLimits),
        ("admission", C.AdmissionConfig),
        ("admission.intake", C.IntakeBoundConfig),
        ("fleet", C.FleetConfig),
        ("replay", C.ReplayConfig),
        ("shutdown", C.ShutdownConfig),
        ("retry", C.RetryConfig),
        ("breaker", C.BreakerConfig),
        ("health", C.HealthConfig),
        ("disk", C.DiskConfig),
        ("logging", C.LoggingConfig),
    ]
    for section, registry in (("sources", SOURCES), ("sinks", SINKS)):
        entries: dict[str, Any] = dict(registry)
        for kind, entry in entries.items():
            out.append((f"{section}[] type: {kind}", entry.model))
            for name, model in _nested(entry.model):
                out.append((f"{section}[].{name} entries ({kind}): {model.__name__}", model))
    out.append(("routes[]", C.Route))
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            return ", ".join(f"{{type: {getattr(v, 'type', '?')}}}" for v in value)
        return f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "**required**"
    if isinstance(field.default, BaseModel):
        return "(see its section)"
    return f"`{field.default!r}`"


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from `ingest/config.py` by `python -m ingest.tools.config_docs`; do not edit.",
        "One YAML file, `ingest run --config FILE` (or `INGEST_CONFIG`). Unknown keys are refused.",
        "Environment overrides: `INGEST_REDIS_URL`, `INGEST_POSTGRES_URL` (production state),",
        "`INGEST_HTTP_PORT`, `INGEST_ADMIN_PORT`, `INGEST_CREDENTIALS_FILE`, `INGEST_DATA_DIR`, "
        "`INGEST_WORKERS`, `INGEST_LOG_FORMAT`.",
        "Credentials (tokens, tenant secrets) never go in this file: see docs/security.md.",
        "",
    ]
    for title, model in sections():
        out += [f"## {title}", "", "| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            tp = _type_name(field.annotation).replace("|", "\\|")
            default = _default(field).replace("|", "\\|")
            out.append(f"| `{name}` | {tp} | {default} | {desc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render())
