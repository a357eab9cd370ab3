"""Secure defaults in the config and who a CLI says it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.cli.common import actor
from ingest.config import parse_config
from ingest.errors import ConfigError


def test_loopback_by_default_and_auth_on() -> None:
    cfg = parse_config({})
    assert cfg.http.host == "127.0.0.1"
    assert not cfg.auth.disabled and cfg.auth.tolerance_seconds == 300
    assert cfg.http.admin_port is None


def test_auth_disabled_shorthand_and_section() -> None:
    assert parse_config({"auth": "disabled"}).auth.disabled
    assert parse_config({"auth": {"mode": "disabled"}}).auth.disabled
    assert not parse_config({"auth": "enabled"}).auth.disabled
    with pytest.raises(ConfigError, match="auth"):
        parse_config({"auth": "off"})
    with pytest.raises(ConfigError, match=r"auth\.tolerance_seconds"):
        parse_config({"auth": {"tolerance_seconds": 0}})


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGEST_ADMIN_PORT", "9091")
    monkeypatch.setenv("INGEST_CREDENTIALS_FILE", "/run/secrets/ingest/credentials.yaml")
    cfg = parse_config({})
    assert cfg.http.admin_port == 9091
    assert cfg.auth.credentials_file == Path("/run/secrets/ingest/credentials.yaml")
    assert parse_config({"auth": "disabled"}).auth.disabled  # the file does not re-enable it


def test_cli_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGEST_ACTOR", "carol")
    assert actor("dave") == "dave"
    assert actor(None) == "carol"
    monkeypatch.setenv("INGEST_ACTOR", " ")
    monkeypatch.setenv("LOGNAME", "erin")
    assert actor(None) == "erin"
