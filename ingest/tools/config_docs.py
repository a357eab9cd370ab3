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

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("top level", C.Config),
    ("http", C.HttpConfig),
    ("auth (or `auth: disabled`)", C.AuthConfig),
    ("state (kind: sqlite, the default)", C.SQLiteStateConfig),
    ("state (kind: production)", C.ProductionStateConfig),
    ("tenants.<tenant> and admission.default_limits", C.TenantLimits),
    ("admission", C.AdmissionConfig),
    ("admission.intake", C.IntakeBoundConfig),
    ("fleet", C.FleetConfig),
    ("replay", C.ReplayConfig),
    ("retry", C.RetryConfig),
    ("breaker", C.BreakerConfig),
    ("sources[] type: inbox", C.InboxSourceConfig),
    ("sources[] type: webhook", C.WebhookSourceConfig),
    ("sources[] type: kafka", C.KafkaSourceConfig),
    ("sources[] type: s3", C.S3SourceConfig),
    ("sources[] type: sftp", C.SFTPSourceConfig),
    ("sinks[] type: sqlite", C.SQLiteSinkConfig),
    ("sinks[] type: postgres", C.PostgresSinkConfig),
    ("sinks[] type: neo4j", C.Neo4jSinkConfig),
    ("sinks[] type: typesense", C.TypesenseSinkConfig),
    ("sinks[].fields.<entity_type>[] (typesense)", C.TypesenseField),
    ("routes[]", C.Route),
]


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
        "`INGEST_HTTP_PORT`, `INGEST_ADMIN_PORT`, `INGEST_CREDENTIALS_FILE`, `INGEST_DATA_DIR`.",
        "Credentials (tokens, tenant secrets) never go in this file: see docs/security.md.",
        "",
    ]
    for title, model in SECTIONS:
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
