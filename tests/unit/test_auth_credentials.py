"""The credentials file: validation that never echoes a secret, dev defaults, reload."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from ingest.auth import credentials as C
from ingest.errors import ConfigError

SECRET = "whsec_do-not-print-me-0123456789"


def test_errors_name_the_key_never_the_value() -> None:
    text = f"tenants:\n  acme-corp:\n    secrets: [{SECRET}, {SECRET}x, {SECRET}y]\n"
    with pytest.raises(ConfigError) as info:
        C.parse(text, "creds.yaml")
    assert "tenants.acme-corp.secrets" in str(info.value)
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError) as info:
        C.parse("tenants:\n  acme-corp:\n    secrets: [short]\n", "creds.yaml")
    assert "16 characters" in str(info.value) and "short" not in str(info.value)
    with pytest.raises(ConfigError, match=r"unknown|Extra"):
        C.parse("tokens: []\npasswords: [x]\n", "creds.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.parse("tokens: [", "creds.yaml")


def test_secrets_stay_out_of_reprs_but_round_trip_through_dump() -> None:
    creds = C.parse(f"tenants:\n  acme-corp:\n    secrets: [{SECRET}]\n", "x")
    assert SECRET not in repr(creds) and SECRET not in str(creds.model_dump())
    again = C.parse(C.dump(creds), "again")
    assert again.secrets_for("acme-corp") == [SECRET]


def test_tokens_are_stored_hashed_and_checked_by_hash() -> None:
    token = C.new_token()
    creds = C.Credentials.model_validate(
        {"tokens": [{"name": "alice", "roles": ["operator"], "sha256": C.sha256_hex(token)}]}
    )
    assert token not in C.dump(creds)
    entry = creds.token(token)
    assert entry is not None and entry.name == "alice" and entry.tenants == ["*"]
    assert creds.token(token + "x") is None and creds.token("") is None


def test_derived_secrets_differ_per_tenant_and_per_key() -> None:
    a = C.derive_secret("whmk_key-one-0123456789", "acme-corp")
    assert a.startswith(C.SECRET_PREFIX)
    assert a != C.derive_secret("whmk_key-one-0123456789", "globex")
    assert a != C.derive_secret("whmk_key-two-0123456789", "acme-corp")
    creds = C.Credentials.model_validate(
        {
            "tenants": {"acme-corp": {"secrets": [SECRET]}},
            "tenant_secret_keys": ["whmk_key-one-0123456789"],
        }
    )
    assert creds.secrets_for("acme-corp") == [SECRET]  # an explicit entry wins
    assert creds.secrets_for("globex") == [C.derive_secret("whmk_key-one-0123456789", "globex")]


def test_dev_credentials_are_private_and_made_once(tmp_path: Path) -> None:
    source, token = C.dev_credentials(tmp_path)
    assert token is not None and token.startswith(C.TOKEN_PREFIX)
    for name in (C.DEV_FILE, C.DEV_TOKEN_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    entry = source.current().token(token)
    assert entry is not None and set(entry.roles) == set(C.Role)
    assert source.current().secrets_for("acme-corp")  # any tenant can sign (derived)
    again, token2 = C.dev_credentials(tmp_path)
    assert token2 == token and again.current() == source.current()
    assert not list(tmp_path.glob(".*.tmp"))


def test_reload_on_change_keeps_the_last_good_credentials(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    t1, t2 = C.new_token(), C.new_token()

    def write(token: str) -> None:
        doc = {"tokens": [{"name": "ops", "roles": ["operator"], "sha256": C.sha256_hex(token)}]}
        C.write_private(path, C.dump(C.Credentials.model_validate(doc)))

    write(t1)
    source = C.CredentialSource(C.read_file(path), path)
    assert source.current().token(t1) is not None
    write(t2)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    source._checked -= 2  # the next look re-reads the file (at most once a second)
    assert source.current().token(t2) is not None and source.current().token(t1) is None
    path.write_text("tokens: [")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    source._checked -= 2
    assert source.current().token(t2) is not None  # the bad edit did not lock anyone out
    assert source.error and "not valid YAML" in source.error
    assert source.health()["error"] == source.error


def test_file_and_inline_together_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    C.write_private(path, "tokens: []\n")
    monkeypatch.setenv(C.ENV_INLINE, "tokens: []")
    with pytest.raises(ConfigError, match="not both"):
        C.configured(path)
    source = C.configured(None)
    assert source is not None and source.origin == f"env {C.ENV_INLINE}"
    monkeypatch.delenv(C.ENV_INLINE)
    assert C.configured(None) is None
