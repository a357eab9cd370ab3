"""Every document the README and docs/ point at is in the repository (a newcomer follows them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
NAMED = re.compile(r"`([\w./-]+\.md)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    text = doc.read_text()
    missing = [
        target
        for target in LINK.findall(text)
        if "://" not in target and not target.startswith("/") and not (doc.parent / target).exists()
    ]
    assert not missing, f"{doc.name} links to files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_documents_exist(doc: Path) -> None:
    """`RUNBOOK.md` in prose must be a file here too, not only in someone's shared folder."""
    missing = [
        name
        for name in NAMED.findall(doc.read_text())
        if not any((base / name).exists() for base in (doc.parent, ROOT, ROOT / "docs"))
        and not list(ROOT.glob(f"**/{Path(name).name}"))
    ]
    assert not missing, f"{doc.name} names documents that are not in the repo: {missing}"


def test_readme_operator_commands_do_not_install_the_dev_toolchain() -> None:
    """Plain `uv run` syncs the dev group (pytest, mypy, test servers) into .venv first: an
    operator's command in the README says `uv run --no-dev`; only Development may omit it."""
    text = (ROOT / "README.md").read_text().split("\n## Development", 1)[0]
    plain = [line for line in text.splitlines() if re.search(r"uv run (?!--no-dev)", line)]
    assert not plain, f"README runs commands with the dev toolchain: {plain}"


def _cli_lines(doc: Path) -> list[list[str]]:
    """The `ingest`/`dlqtriage`/`replayctl` command lines of a doc's bash blocks, as words."""
    import shlex

    out: list[list[str]] = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split(" #")[0].split("|")[0].replace("<", "").replace(">", "")
            if command.split()[:1] in (["ingest"], ["dlqtriage"], ["replayctl"]):
                out.append(shlex.split(command))
    return out


def test_operations_commands_exist_with_their_flags() -> None:
    """docs/operations.md names only subcommands and flags the real CLIs accept."""
    import typer

    from ingest.cli import dlqtriage, ingest, replayctl

    apps = {"ingest": ingest.app, "dlqtriage": dlqtriage.app, "replayctl": replayctl.app}
    lines = _cli_lines(ROOT / "docs" / "operations.md")
    assert len(lines) >= 12
    for words in lines:
        group = typer.main.get_command(apps[words[0]])
        sub = group.commands.get(words[1])  # type: ignore[attr-defined]
        assert sub is not None, f"{' '.join(words)}: no command {words[1]!r}"
        known = {o for p in sub.params for o in (*p.opts, *p.secondary_opts)}
        flags = [w.split("=")[0] for w in words[2:] if w.startswith("-")]
        unknown = [f for f in flags if f not in known]
        assert not unknown, f"{' '.join(words)}: {words[0]} {words[1]} has no {unknown}"
