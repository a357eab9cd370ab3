"""docs/config.md is generated from the config models and must match them."""

from pathlib import Path

from ingest.tools.config_docs import render

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_up_to_date() -> None:
    page = (ROOT / "docs" / "config.md").read_text()
    assert page == render() + "\n", (
        "docs/config.md is stale: run `uv run python -m ingest.tools.config_docs > docs/config.md`"
    )


def test_every_settings_section_has_its_table() -> None:
    """A new top-level settings model (e.g. `logging`) gets its own section in the page."""
    from pydantic import BaseModel

    from ingest.config import Config
    from ingest.tools.config_docs import sections

    listed = {model for _, model in sections()}
    nested = [
        (name, f.annotation)
        for name, f in Config.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
    ]
    missing = [name for name, model in nested if model not in listed]
    assert not missing, f"config sections without a table in docs/config.md: {missing}"
