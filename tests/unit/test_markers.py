"""Every test module of tests/integration and tests/e2e carries its folder's marker, so
`pytest -m integration` / `-m "not e2e"` select what they say (markers: pyproject.toml)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"integration": "integration", "e2e": "e2e"}


def marks_of(module: Path) -> set[str]:
    """The `pytest.mark.<name>` names in the module-level `pytestmark` assignment."""
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            return {
                n.attr
                for n in ast.walk(node.value)
                if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Attribute)
                and n.value.attr == "mark"
            }
    return set()


MODULES = [
    (folder, m) for folder in FOLDERS for m in sorted((ROOT / "tests" / folder).glob("test_*.py"))
]


@pytest.mark.parametrize(("folder", "module"), MODULES, ids=lambda x: getattr(x, "name", x))
def test_module_carries_its_folders_marker(folder: str, module: Path) -> None:
    assert FOLDERS[folder] in marks_of(module), (
        f"{module.relative_to(ROOT)} lacks `pytestmark = pytest.mark.{FOLDERS[folder]}`"
    )


def test_markers_are_declared() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"
    ]["markers"]
    names = {m.split(":")[0] for m in declared}
    assert set(FOLDERS.values()) <= names
