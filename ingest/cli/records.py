"""`ingest records`: a tenant's rows in a table sink, readably (the newcomer's "did it land?").

`select *` on the sink prints the dedupe key as binary; this shows it as hex and the JSON
columns decoded. It reads only (never creates a table or a database file) from the SQLite or
Postgres sink of the config; Neo4j and Typesense have their own readers (docs/sinks.md).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Annotated, Any

import typer

from ingest import config as C
from ingest.cli.common import EXIT_UNAVAILABLE, EXIT_USAGE, fail, load

_COLS = "entity_type, entity_id, revision, deleted, occurred_at, updated_at, dedupe_key, attributes"
_NAMES = [c.strip() for c in _COLS.split(",")]


def _pick_sink(cfg: C.Config, name: str | None) -> C.SQLiteSinkConfig | C.PostgresSinkConfig:
    tables = [s for s in cfg.sinks if isinstance(s, C.SQLiteSinkConfig | C.PostgresSinkConfig)]
    if name is not None:
        named = [s for s in cfg.sinks if s.name == name]
        if not named:
            fail(f"--sink {name}: no such sink (configured: {[s.name for s in cfg.sinks]})")
        if named[0] not in tables:
            fail(
                f"--sink {name} is a {named[0].type} sink: ingest records reads SQLite and "
                "Postgres sinks (docs/sinks.md says how to read the others)",
                EXIT_USAGE,
            )
        return named[0]
    if not tables:
        fail("no SQLite or Postgres sink in the config: nothing for ingest records to read")
    return tables[0]


def _where(
    tenant: str, entity_type: str | None, deleted: bool, param: str
) -> tuple[str, list[str]]:
    """WHERE clause and its parameters; `param` is the driver's placeholder, e.g. '?'."""
    marks = iter(["$1", "$2"] if param == "$" else ["?", "?"])
    sql, args = f"WHERE tenant = {next(marks)}", [tenant]
    if entity_type is not None:
        sql += f" AND entity_type = {next(marks)}"
        args.append(entity_type)
    if not deleted:
        sql += " AND NOT deleted" if param == "$" else " AND deleted = 0"
    return sql, args


def _read_sqlite(path: Path, tenant: str, et: str | None, deleted: bool, limit: int) -> list[Any]:
    if not path.exists():
        fail(
            f"sqlite sink at {path.resolve()} does not exist: run ingest records where the "
            "service keeps its data/ directory, or set INGEST_DATA_DIR / --config",
            EXIT_UNAVAILABLE,
        )
    where, args = _where(tenant, et, deleted, "?")
    sql = f"SELECT {_COLS} FROM entities {where} ORDER BY updated_at DESC LIMIT {int(limit)}"
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(sql, args).fetchall()
    except sqlite3.Error as exc:
        fail(f"sqlite sink at {path}: {exc}", EXIT_UNAVAILABLE)


async def _read_postgres(
    dsn: str, table: str, tenant: str, et: str | None, deleted: bool, limit: int
) -> list[Any]:
    import asyncpg  # type: ignore[import-untyped]  # no stubs

    where, args = _where(tenant, et, deleted, "$")
    sql = (
        f"SELECT {_COLS.replace('attributes', 'attributes::text')} FROM {table} {where}"
        f" ORDER BY updated_at DESC LIMIT {int(limit)}"
    )
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        fail(f"postgres sink unreachable: {exc}", EXIT_UNAVAILABLE)
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    except asyncpg.UndefinedTableError:
        return []  # the service creates the table on its first start
    finally:
        await conn.close()


def _row(values: Any) -> dict[str, Any]:
    row = dict(zip(_NAMES, values, strict=True))
    key = row["dedupe_key"]
    row["dedupe_key"] = bytes(key).hex() if key is not None else None
    row["deleted"] = bool(row["deleted"])
    for col in ("occurred_at", "updated_at"):
        if row[col] is not None and not isinstance(row[col], str | float):
            row[col] = row[col].isoformat()
    if isinstance(row["attributes"], str):
        row["attributes"] = json.loads(row["attributes"])
    return row


def records(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant whose records to show.")],
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 20,
    entity_type: Annotated[str | None, typer.Option(help="Only this entity type.")] = None,
    deleted: Annotated[bool, typer.Option("--deleted", help="Include tombstones.")] = False,
    sink: Annotated[
        str | None, typer.Option(help="Sink name (default: the first SQLite/Postgres sink).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Service config file.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
) -> None:
    """The records a tenant has in the sink, newest first (dedupe key as hex)."""
    cfg = load(config)
    sc = _pick_sink(cfg, sink)
    if isinstance(sc, C.SQLiteSinkConfig):
        path = cfg.under_data_dir(sc.path, "sink.db")
        raw = _read_sqlite(path, tenant, entity_type, deleted, limit)
    else:
        dsn = sc.dsn or getattr(cfg.state, "postgres_url", None)
        if dsn is None:
            fail(f"sink {sc.name}: no dsn (and state is not production)", EXIT_USAGE)
        raw = asyncio.run(_read_postgres(dsn, sc.table, tenant, entity_type, deleted, limit))
    rows = [_row(r) for r in raw]
    if json_out:
        print(json.dumps({"sink": sc.name, "tenant": tenant, "records": rows}, indent=2))
        return
    _print_table(sc.name, tenant, rows)


def _print_table(sink: str, tenant: str, rows: list[dict[str, Any]]) -> None:
    """One line per record; the key's first 8 bytes (the whole key with --json)."""
    from rich.table import Table

    from ingest.tools.console import console

    table = Table(title=f"{len(rows)} record(s) of tenant {tenant} in sink {sink}")
    for name in ("entity_type", "entity_id", "rev", "occurred_at", "dedupe_key"):
        table.add_column(name, no_wrap=True)
    table.add_column("attributes", overflow="ellipsis", no_wrap=True)
    for r in rows:
        eid = r["entity_id"] + (" (deleted)" if r["deleted"] else "")
        key = (r["dedupe_key"] or "")[:16] + "…"
        attrs = json.dumps(r["attributes"], separators=(",", ":"))
        table.add_row(r["entity_type"], eid, str(r["revision"]), str(r["occurred_at"]), key, attrs)
    con = console()
    con.width = max(con.width, 120)
    con.print(table)
