"""What every console script shares: config loading, logging, clean error exits.

`CLI` is the Typer app every console script is built with. Before any command runs it refuses
arguments that are not UTF-8 (or hold a NUL) with exit 2, and an exception no command put in
words ends in one line on stderr and exit 1, never a traceback (INGEST_DEBUG=1 shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from typer import _click as click  # Typer's own copy of click: its types and exceptions
from typer._click.exceptions import UsageError
from typer.core import TyperCommand, TyperGroup, TyperOption

from ingest.config import Config, load_config
from ingest.errors import ConfigError
from ingest.logctx import setup_logging as setup_logging  # the CLIs' and pod workers' one
from ingest.names import NAME_RULE_TEXT, representable, shown, valid_name
from ingest.tools.console import console, styled

T = TypeVar("T")
err_console = console(stderr=True)


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
    styled(err_console, "[bold red]error:[/] {}", shown(message))
    sys.exit(code)


# ------------------------------------------------------------------------------ the Typer app

_PASS_THROUGH = (typer.TyperException, typer.Exit, typer.Abort)


def _check_args(args: list[str]) -> None:
    for arg in args:
        if not representable(arg):
            raise UsageError(f"argument '{shown(arg)}' is not valid UTF-8")
        if "\0" in arg:
            raise UsageError(f"argument {arg!r} contains a NUL character")


def _plain_flags(params: list[click.Parameter]) -> list[click.Parameter]:
    """Flags take no value: show no `<bool>` type next to them in --help."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class CLICommand(TyperCommand):
    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return _plain_flags(super().get_params(ctx))


class CLIGroup(TyperGroup):
    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return _plain_flags(super().get_params(ctx))

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _check_args(args)
        return super().parse_args(ctx, args)

    def main(self, *args: Any, **kw: Any) -> Any:
        """Usage errors in one line like every other error, `error: <what> (see `<command>
        --help`)`, exit 2; Typer drew them in a box of 80 columns that broke the message
        over lines, after the usage line."""
        if kw.get("standalone_mode", True) is False:
            return super().main(*args, **kw)
        try:
            rv = super().main(*args, **{**kw, "standalone_mode": False})
        except click.exceptions.ClickException as exc:
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one printed the help already
                ctx = getattr(exc, "ctx", None)
                hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                fail(exc.format_message().rstrip(".") + hint, exc.exit_code)
            sys.exit(exc.exit_code)
        except typer.Abort:
            fail("aborted", EXIT_FAILED)
        sys.exit(rv if type(rv) is int else EXIT_OK)  # an int is typer.Exit's code

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (*_PASS_THROUGH, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("INGEST_DEBUG"):
                raise
            log = logging.getLogger("ingest.cli")
            log.debug("unexpected error", exc_info=True)
            fail(
                f"unexpected {type(exc).__name__}: {exc} (a bug: please report it with the "
                "command; INGEST_DEBUG=1 shows the traceback)",
                EXIT_FAILED,
            )


class CLI(typer.Typer):
    """typer.Typer with CLIGroup/CLICommand and no pretty tracebacks."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(cls=CLIGroup, pretty_exceptions_enable=False, **kw)

    def command(self, *args: Any, **kw: Any) -> Callable[[Any], Any]:
        kw.setdefault("cls", CLICommand)
        return super().command(*args, **kw)


# ------------------------------------------------------------------------------ option values


def tenant_name(value: str | None, option: str = "--tenant") -> str | None:
    """A tenant for something new (a plan): the service's tenant name rule, else exit 2."""
    if value is not None and not valid_name(value):
        fail(f"{option} '{value}' is not a valid tenant name ({NAME_RULE_TEXT})", EXIT_USAGE)
    return value


def finite(value: float, option: str, *, low: float, high: float) -> float:
    """A number within [low, high] (nan and inf never are), else exit 2."""
    if not (math.isfinite(value) and low <= value <= high):
        fail(f"{option} must be a number from {low:g} to {high:g}; got {value}", EXIT_USAGE)
    return value


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


def parse_when(value: str | None, option: str) -> datetime | None:
    """ISO 8601 (naive = UTC) or a relative age like 30m, 2h, 7d; exit 2 otherwise."""
    from ingest.timefmt import parse_when as parse

    if value is None:
        return None
    try:
        return parse(value)
    except (ValueError, OverflowError) as exc:
        fail(f"{option} {exc}", EXIT_USAGE)


def actor(option: str | None) -> str:
    """Who runs this CLI, for the audit trail and four-eyes checks: --as, else INGEST_ACTOR,
    else the OS user. A statement, not a proof: for CLIs that open the stores directly the
    store credentials are the boundary (docs/security.md)."""
    for value in (option, os.environ.get("INGEST_ACTOR")):
        if value is not None and value.strip():
            return value.strip()
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"


async def audit_cli(
    stores: Any,
    who: str,
    action: str,
    *,
    outcome: str = "ok",
    tenant: str | None = None,
    target: str = "",
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one audit row for a CLI action, on the store the CLI opened."""
    from ingest.state.audit import AuditEntry, audit_store

    entry = AuditEntry(
        at=time.time(),
        actor=who,
        via="cli",
        action=action,
        outcome=outcome,
        remote=f"cli@{socket.gethostname()}",
        tenant=tenant,
        target=target,
        detail=detail or {},
    )
    await audit_store(stores).record(entry)


class StopFlag:
    """First SIGINT/SIGTERM: finish the unit of work in flight (a redrive page, a replay
    batch), save progress, stop. A second one: stop now (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def _signal(self) -> None:
        if self._set:
            raise KeyboardInterrupt
        self._set = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._signal)
        try:
            yield self
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
