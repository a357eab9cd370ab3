"""docs/config.md is generated from the config models and must match them."""

from pathlib import Path

from ingest.tools.config_docs import render

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_up_to_date() -> None:
    page = (ROOT / "docs" / "config.md").read_text()
    assert page == render() + "\n", (
        "docs/config.md is stale: run `uv run python -m ingest.tools.config_docs > docs/config.md`"
    )
