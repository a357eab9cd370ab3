"""Every program a test or benchmark runs is in scripts/services/tools.list, and the check that
`make test` runs first (scripts/check-tools.sh) names everything missing."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
TOOLS_LIST = ROOT / "scripts" / "services" / "tools.list"
CHECK = ROOT / "scripts" / "check-tools.sh"
LIB = ROOT / "scripts" / "services" / "lib.sh"
# Shell builtins, and programs in every Debian (essential packages): no entry needed.
ESSENTIAL = {".", "source", "echo", "printf", "test", "true", "false", "cd", "exit", "export",
             "bash", "sh", "cat", "grep", "sed", "env", "kill", "sleep", "gzip", "tar",
             "awk"}  # fmt: skip
SPAWN = {"run", "Popen", "check_output", "check_call", "call", "create_subprocess_exec"}


def listed() -> set[str]:
    """Programs in tools.list, and the shell functions of scripts/services/lib.sh."""
    names = set(re.findall(r"^(\w+)\(\) \{", LIB.read_text(), re.M))
    for line in TOOLS_LIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            names.add(Path(line.split()[0]).name)
    return names


def _shell_programs(command: str) -> Iterator[str]:
    """First word of each part of a shell pipeline / list."""
    for part in re.split(r"\|\||&&|[|;]", command):
        words = part.split()
        if words:
            yield words[0]


def _text(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):  # f-string: its literal parts
        return " ".join(_text(v) or "x" for v in node.values)
    return None


def programs_run(tree: ast.AST) -> Iterator[str]:
    """Programs named literally in subprocess calls and shutil.which() in a module."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
            continue
        module, name, first = func.value.id, func.attr, node.args[0]
        if (module, name) == ("shutil", "which"):
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield first.value
        elif module in ("subprocess", "asyncio") and name in SPAWN:
            argv = list(first.elts) if isinstance(first, ast.List | ast.Tuple) else node.args
            words = [_text(a) for a in argv]
            if words and isinstance(argv[0], ast.Constant) and words[0] is not None:
                yield words[0]
                if words[0] in ("bash", "sh") and "-c" in words:
                    script = words[words.index("-c") + 1 :][:1]
                    for s in script:
                        if s is not None:
                            yield from _shell_programs(s)


def test_every_program_the_tests_and_benchmarks_run_is_listed() -> None:
    known = listed() | ESSENTIAL
    unlisted: dict[str, list[str]] = {}
    for path in sorted([*ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/**/*.py")]):
        for prog in programs_run(ast.parse(path.read_text())):
            if prog not in known and Path(prog).name not in known:
                unlisted.setdefault(prog, []).append(str(path.relative_to(ROOT)))
    assert not unlisted, f"add these to {TOOLS_LIST.relative_to(ROOT)}: {unlisted}"


def test_the_scanner_finds_each_spawn_form() -> None:
    src = """
subprocess.run(["kcat", "-b", b])
subprocess.Popen(("psql", url))
asyncio.create_subprocess_exec("aws", "s3", "ls")
shutil.which("promtool")
subprocess.run(["bash", "-c", f"curl -s {u} | jq '.x' && redis-cli ping"])
"""
    assert list(programs_run(ast.parse(src))) == [
        "kcat", "psql", "aws", "promtool", "bash", "curl", "jq", "redis-cli"]  # fmt: skip


def check(tmp_path: Path, entries: list[str]) -> subprocess.CompletedProcess[str]:
    lst = tmp_path / "tools.list"
    lst.write_text("# a comment\n\n" + "".join(f"{e}\n" for e in entries))
    return subprocess.run(["bash", str(CHECK)], env={**os.environ, "TOOLS_LIST": str(lst)},
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_check_tools_passes_when_everything_is_present(tmp_path: Path) -> None:
    done = check(tmp_path, ["bash deb:bash x", "/bin/s[h] deb:dash y"])
    assert done.returncode == 0, done.stderr
    assert "all 2 programs" in done.stdout


@settings(max_examples=20, deadline=None)
@given(st.lists(st.from_regex(r"[a-z][a-z0-9-]{2,12}", fullmatch=True), min_size=1,
                max_size=4, unique=True))  # fmt: skip
def test_check_tools_names_every_missing_program(names: list[str]) -> None:
    import tempfile

    missing = [f"no-such-{n}" for n in names]
    with tempfile.TemporaryDirectory() as tmp:
        done = check(Path(tmp), ["bash deb:bash present", *(f"{m} deb:pkg-{m} t" for m in missing),
                                 "/no/such/*/glob deb:globpkg t"])  # fmt: skip
    assert done.returncode == 1
    assert f"{len(missing) + 1} program(s) missing" in done.stderr
    for m in missing:
        assert re.search(rf"^\s+{re.escape(m)}\s+deb:pkg-{re.escape(m)}\s", done.stderr, re.M)
    assert "/no/such/*/glob" in done.stderr and "bash " not in done.stderr


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").rglob("*.sh")), ids=lambda p: p.name)
def test_scripts_are_valid_bash(script: Path) -> None:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
