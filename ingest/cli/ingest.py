"""`ingest`: run the service, check a config, and inspect its state stores."""

from __future__ import annotations

import sys

from ingest.pod import prestart

# First, before the imports below (~0.4 s of CPU): `ingest run`'s fork server starts importing
# its workers' modules now, on the other core (ingest/pod/prestart.py).
if prestart.main_is_cli(__name__):
    prestart.start_early(sys.argv)

import asyncio
import enum
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ingest.cli.common import (
    CLI,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    fail,
    load,
    load_existing_state,
    setup_logging,
)
from ingest.config import SQLiteStateConfig
from ingest.datadir import DataDirInUse, hold
from ingest.errors import ConfigError, IngestError, StoreUnavailable
from ingest.tools.console import console

app = CLI(
    help="Multi-tenant ingest service: sources -> schema -> dedupe -> sinks, with a DLQ.\n\n"
    "Without a config file it runs embedded: SQLite state and sink under ./data, an inbox "
    "directory and webhooks. Config: --config FILE or INGEST_CONFIG.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (default: embedded).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def service_mode(service: Any) -> str:
    return "embedded" if isinstance(service.config.state, SQLiteStateConfig) else "production"


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


def _banner(service: Any, host: str, port: int) -> None:
    from ingest.auth.setup import banner
    from ingest.sources.inbox import InboxSource

    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    record = {
        "schema_version": 3,
        "tenant_id": "acme-corp",
        "entity_type": "order",
        "entity_id": "o-1",
        "revision": 1,
        "occurred_at": "2025-01-01T00:00:00Z",
        "attributes": {"amount": 12.5, "currency": "EUR"},
    }
    ops, post = banner(service.config, base, json.dumps(record, separators=(",", ":")))
    lines = [
        f"ingest is running ({service_mode(service)} mode, worker {service.worker}"
        + (f", {service.count} pipeline workers)" if hasattr(service, "count") else ")")
        + f" on {base}",
        *ops,
        f"  metrics:  curl -s {base}/metrics | grep ^ingest_",
    ]
    roots = [s.root for s in getattr(service, "sources", []) if isinstance(s, InboxSource)]
    if hasattr(service, "count"):  # a pod: its workers read the inbox(es) of the config
        roots = [
            service.config.under_data_dir(sc.path, "inbox")
            for sc in service.config.sources
            if sc.type == "inbox"
        ]
    for root in (r.resolve() for r in roots):
        lines.append(f"  drop files (.jsonl, .csv, .gz) into {root}/<tenant>/")
        lines.append(f"            e.g. {root}/acme-corp/orders.jsonl")
    if service.intake is not None:
        lines.append("  post a record (signed):")
        lines += post
    lines.append("  stop: Ctrl-C or SIGTERM (drains, flushes, checkpoints, exits 0)")
    print("\n".join(lines), flush=True)


@app.command()
def run(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default from config).")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="HTTP port (default 8080).")
    ] = None,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, envvar="INGEST_LOG_LEVEL")
    ] = LogLevel.INFO,
) -> None:
    """Run the service until SIGTERM / Ctrl-C."""
    cfg = load(config)
    setup_logging(log_level.value, cfg.logging.format)
    if cfg.worker_count() > 1:  # a pod: its workers' imports start now, beside ours (or did)
        from ingest.pod.spawn import start_fork_server

        start_fork_server(cfg)
    else:  # one process: a fork server started on speculation is not needed
        prestart.stop_early()
    from ingest.service import serve

    h = host or cfg.http.host
    p = port if port is not None else cfg.http.port
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay runnable without it
        pass
    try:
        if isinstance(cfg.state, SQLiteStateConfig):  # embedded: one service per data dir
            held = hold(cfg.data_dir, p)  # noqa: F841 - the lock lives as long as the file
        asyncio.run(serve(cfg, host=h, port=p, ready=lambda s: _banner(s, h, p)))
    except StoreUnavailable as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    except (ConfigError, DataDirInUse) as exc:  # e.g. production without credentials
        fail(str(exc), EXIT_USAGE)
    except (IngestError, OSError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@app.command("check-config")
def check_config(config: ConfigOpt = None) -> None:
    """Validate a config file and print the effective configuration."""
    cfg = load(config)
    print(cfg.model_dump_json(indent=2))


@app.command("idempotency-stats")
def idempotency_stats(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Key count, memory and oldest bucket of the idempotency store.

    `redis-cli INFO keyspace | grep ingest_idempotency` cannot show these: INFO keyspace only
    counts keys per database, and the store packs many dedupe keys into each Redis hash.
    """
    # run from the wrong directory it created an empty ./data/state.db and reported 0 keys
    cfg = load_existing_state(config, "ingest idempotency-stats")

    async def go() -> dict[str, Any]:
        from ingest.factory import open_stores

        stores = await open_stores(cfg)
        try:
            return await stores.idempotency.stats()
        finally:
            await stores.close()

    try:
        stats = asyncio.run(go())
    except StoreUnavailable as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    if json_out:
        print(json.dumps(stats, indent=2, default=str))
        return
    from rich.table import Table

    table = Table(title="idempotency keys")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        table.add_row(key, str(value))
    console().print(table)


def _credentials_commands() -> None:
    """`ingest auth ...`, `ingest sign`, `ingest post`, `ingest audit` (docs/security.md)."""
    from ingest.cli import audit as audit_cli
    from ingest.cli import auth as auth_cli

    app.add_typer(auth_cli.app, name="auth")
    app.command("sign")(auth_cli.sign)
    app.command("post")(auth_cli.post)
    app.command("audit")(audit_cli.audit)


_credentials_commands()


def _records_command() -> None:
    """`ingest records`: what landed in a table sink, readably (ingest/cli/records.py)."""
    from ingest.cli.records import records

    app.command("records")(records)


_records_command()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
