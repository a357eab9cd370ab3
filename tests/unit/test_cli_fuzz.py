"""Every command and flag of `ingest`, `dlqtriage` and `replayctl` against generated arguments.

Run in-process through Typer's CLI runner, on an embedded data dir whose state store exists (so
commands get past the store check and reach their real work). Whatever the arguments: the exit
code is one of the documented ones and no traceback (nor the last-resort "a bug" line)
reaches the operator. `ingest run` is fuzzed with the server start stubbed out.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.core import TyperOption
from typer.main import get_command
from typer.testing import CliRunner

from ingest.cli import dlqtriage, replayctl
from ingest.cli import ingest as ingest_cli
from ingest.state.sqlite import SQLiteDB

EXIT_CODES = {0, 1, 2, 3, 130}
APPS: dict[str, typer.Typer] = {
    "ingest": ingest_cli.app,
    "dlqtriage": dlqtriage.app,
    "replayctl": replayctl.app,
}

_VALUES = st.one_of(
    st.sampled_from(
        [
            "inf", "-inf", "nan", "NaN", "-1", "0", "1", "0.0001", "1e308", "1e309", "-0",
            "99999999999999999999999999", "9223372036854775808", "", " ", "acme-corp",
            "ACME Corp", "a" * 70, "../../etc", "/", ".", "rp-1", "rp-00000000000000000000",
            "SCHEMA_DRIFT", "validation_fail", "s3,kafka", "inbox", ",,,", "-", "--",
            "2025-01-01T00:00:00Z", "2025-13-01", "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00", "7d", "1.5h", "99999999999999d", "30m", "RFA-1",
            "\udcff", "a\udcffb", "caf\u00e9", "\u202e", "DEBUG", "loud", "65536", "70000",
            "localhost", "--help", "-h", "--json",
        ]
    ),
    st.text(max_size=12),
    st.integers().map(str),
    st.floats().map(str),
)


def _commands() -> list[tuple[str, str, list[TyperOption]]]:
    out = []
    for tool, app in APPS.items():
        group = get_command(app)
        for name, cmd in group.commands.items():  # type: ignore[attr-defined]
            opts = [p for p in cmd.params if isinstance(p, TyperOption)]
            out.append((tool, name, opts))
    return out


COMMANDS = _commands()


@st.composite
def invocations(draw: st.DrawFn) -> tuple[str, list[str]]:
    tool, name, opts = draw(st.sampled_from(COMMANDS))
    args = [name]
    for opt in draw(st.lists(st.sampled_from(opts), max_size=6)) if opts else []:
        args.append(draw(st.sampled_from(opt.opts + opt.secondary_opts)))
        if not opt.is_flag:
            args.append(draw(_VALUES))
    if draw(st.booleans()):  # stray positional values (plan ids, typos)
        args.insert(draw(st.integers(1, len(args))), draw(_VALUES))
    return tool, args


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("cli-fuzz") / "data"
    path.mkdir()

    async def make() -> None:
        await (await SQLiteDB.open(path / "state.db")).close()

    asyncio.run(make())
    yield path


@pytest.fixture(scope="module")
def stub_serve() -> Iterator[None]:
    import ingest.service

    async def serve(*args: Any, **kw: Any) -> None:
        return None

    real = ingest.service.serve
    ingest.service.serve = serve  # type: ignore[assignment]
    yield
    ingest.service.serve = real


def check(tool: str, args: list[str], data_dir: Path) -> None:
    env = {"INGEST_DATA_DIR": str(data_dir), "INGEST_CONFIG": "", "INGEST_DEBUG": ""}
    old = os.getcwd()
    os.chdir(data_dir.parent)
    try:
        result = CliRunner().invoke(APPS[tool], args, env=env)
    finally:
        os.chdir(old)
    shown = f"{tool} {args!r} -> {result.exit_code}:\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        shown + f"\n{result.exception!r}"
    )
    assert result.exit_code in EXIT_CODES, shown
    assert "Traceback" not in result.output, shown
    assert "a bug: please report" not in result.output, shown


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(call=invocations())
def test_any_arguments_exit_cleanly(
    call: tuple[str, list[str]], data_dir: Path, stub_serve: None
) -> None:
    tool, args = call
    check(tool, args, data_dir)


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("dlqtriage", ["purge", "--older-than", "inf", "--yes"]),
        ("dlqtriage", ["purge", "--older-than", "nan", "--yes"]),
        ("dlqtriage", ["purge", "--older-than", "-1", "--yes"]),
        ("dlqtriage", ["purge", "--older-than", "1e300", "--yes"]),
        ("dlqtriage", ["summary", "--tenant", "acme\udcff"]),
        ("dlqtriage", ["redrive", "--reason", "CONNECTION_ERROR", "--since", "99999999999d"]),
        ("dlqtriage", ["redrive", "--id", "99999999999999999999"]),
        ("replayctl", ["plan", "--tenant", "Bad Tenant", "--from", "2025-01-01T00:00:00Z",
                       "--to", "2025-01-02T00:00:00Z", "--sources", "inbox"]),
        ("replayctl", ["plan", "--tenant", "acme", "--from", "2025-01-01T00:00:00Z",
                       "--to", "2025-01-02T00:00:00Z", "--sources", "inbox", "--throttle", "inf"]),
        ("replayctl", ["plan", "--tenant", "acme", "--from", "0001-01-01T00:00:00+01:00",
                       "--to", "2025-01-02T00:00:00Z", "--sources", "inbox"]),
        ("ingest", ["run", "--port", "70000"]),
        ("ingest", ["run", "--log-level", "loud"]),
    ],
)
def test_issue_examples_are_usage_errors(
    tool: str, args: list[str], data_dir: Path, stub_serve: None
) -> None:
    env = {"INGEST_DATA_DIR": str(data_dir), "INGEST_CONFIG": ""}
    result = CliRunner().invoke(APPS[tool], args, env=env)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "error" in result.output.lower() or "invalid" in result.output.lower()


def test_flags_show_no_type_in_help() -> None:
    for app in APPS.values():
        result = CliRunner().invoke(app, ["--help"])
        assert "<bool>" not in result.output
    result = CliRunner().invoke(dlqtriage.app, ["purge", "--help"])
    assert "--dry-run" in result.output and "<bool>" not in result.output
