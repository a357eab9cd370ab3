"""What every console script shares: config loading, logging, clean error exits."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import NoReturn, TypeVar

from rich.console import Console

from ingest.config import Config, load_config
from ingest.errors import ConfigError, IngestError

T = TypeVar("T")
err_console = Console(stderr=True)

# Exit codes shared by the CLIs: scripts can tell a usage error from an unreachable store.
EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and found a problem (e.g. redrive left failures)
EXIT_USAGE = 2  # bad arguments or config
EXIT_UNAVAILABLE = 3  # a store or server could not be reached


def config_path(option: Path | None) -> Path | None:
    if option is not None:
        return option
    env = os.environ.get("INGEST_CONFIG")
    return Path(env) if env else None


def load(option: Path | None) -> Config:
    try:
        return load_config(config_path(option))
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(code)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def exit_code_for(exc: BaseException) -> int:
    from ingest.errors import StoreUnavailable

    if isinstance(exc, StoreUnavailable):
        return EXIT_UNAVAILABLE
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    if isinstance(exc, IngestError):
        return EXIT_FAILED
    return EXIT_FAILED


def load_existing_state(option: Path | None, tool: str) -> Config:
    """The service's config, for a CLI that reads the service's state. An embedded store
    that does not exist is 'unreachable' (exit 3), never silently created empty: the usual
    cause is running from the wrong directory."""
    from ingest.config import SQLiteStateConfig

    cfg = load(option)
    if isinstance(cfg.state, SQLiteStateConfig):
        db = cfg.under_data_dir(cfg.state.path, "state.db")
        if not db.exists():
            fail(
                f"sqlite state store at {db.resolve()} does not exist: run {tool} where the "
                "service keeps its data/ directory, or set INGEST_DATA_DIR / --config",
                EXIT_UNAVAILABLE,
            )
    return cfg


def run_async(coro: Awaitable[T], usage_errors: tuple[type[Exception], ...] = ()) -> T:
    """asyncio.run with failures in words: an unreachable store exits 3, a config error or
    one of `usage_errors` exits 2; never a traceback."""
    from ingest.errors import StoreUnavailable

    async def main() -> T:
        return await coro

    usage: tuple[type[Exception], ...] = (ConfigError, *usage_errors)
    try:
        return asyncio.run(main())
    except StoreUnavailable as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    except usage as exc:
        fail(str(exc), EXIT_USAGE)
