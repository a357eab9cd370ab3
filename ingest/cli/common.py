"""What every console script shares: config loading, logging, clean error exits."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from ingest.config import Config, load_config
from ingest.errors import ConfigError, IngestError

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
