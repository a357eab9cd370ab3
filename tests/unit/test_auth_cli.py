"""`ingest auth ...` edits the credentials file and prints each new secret once; `ingest sign`."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ingest.auth import credentials as C
from ingest.auth import signing
from ingest.cli.ingest import app

runner = CliRunner()


def ingest(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def creds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("INGEST_CREDENTIALS_FILE", raising=False)
    monkeypatch.delenv("INGEST_CREDENTIALS", raising=False)
    monkeypatch.setenv("INGEST_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "credentials.yaml"


def test_tokens(creds: Path) -> None:
    code, out, _ = ingest(
        "auth",
        "new-token",
        "--name",
        "alice",
        "--roles",
        "viewer,operator",
        "--tenants",
        "acme-corp",
        "--expires",
        "30d",
        "--file",
        str(creds),
    )
    token = out.strip()
    assert code == 0 and token.startswith(C.TOKEN_PREFIX)
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert token not in creds.read_text()
    entry = C.read_file(creds).token(token)
    assert entry is not None and entry.tenants == ["acme-corp"] and entry.expires is not None
    assert (
        ingest("auth", "new-token", "--name", "alice", "--roles", "viewer", "--file", str(creds))[0]
        == 2
    )
    assert (
        ingest("auth", "new-token", "--name", "bob", "--roles", "root", "--file", str(creds))[0]
        == 2
    )
    assert ingest("auth", "revoke-token", "--name", "alice", "--file", str(creds))[0] == 0
    assert C.read_file(creds).token(token) is None
    assert ingest("auth", "revoke-token", "--name", "alice", "--file", str(creds))[0] == 2


def test_secret_rotation_and_api_keys(creds: Path) -> None:
    first = ingest("auth", "add-secret", "--tenant", "acme-corp", "--file", str(creds))[1].strip()
    second = ingest("auth", "add-secret", "--tenant", "acme-corp", "--file", str(creds))[1].strip()
    assert C.read_file(creds).secrets_for("acme-corp") == [first, second]
    assert ingest("auth", "add-secret", "--tenant", "acme-corp", "--file", str(creds))[0] == 2
    assert (
        ingest("auth", "tenant-secret", "--tenant", "acme-corp", "--file", str(creds))[1].strip()
        == second
    )
    assert ingest("auth", "retire-secret", "--tenant", "acme-corp", "--file", str(creds))[0] == 0
    assert C.read_file(creds).secrets_for("acme-corp") == [second]
    assert ingest("auth", "retire-secret", "--tenant", "acme-corp", "--file", str(creds))[0] == 2
    key = ingest("auth", "new-api-key", "--tenant", "acme-corp", "--file", str(creds))[1].strip()
    assert C.read_file(creds).api_key_tenant(key) == "acme-corp"
    assert ingest("auth", "revoke-api-key", "--tenant", "acme-corp", "--file", str(creds))[0] == 0
    assert C.read_file(creds).api_key_tenant(key) is None
    assert ingest("auth", "add-secret", "--tenant", "Not A Tenant", "--file", str(creds))[0] == 2
    code, out, _ = ingest("auth", "list", "--json", "--file", str(creds))
    assert code == 0 and second not in out and '"secrets": 1' in out


def test_a_derived_tenant_keeps_its_secret_when_given_its_own(creds: Path) -> None:
    assert ingest("auth", "add-secret-key", "--file", str(creds))[0] == 0
    derived = ingest("auth", "tenant-secret", "--tenant", "globex", "--file", str(creds))[1].strip()
    own = ingest("auth", "add-secret", "--tenant", "globex", "--file", str(creds))[1].strip()
    assert C.read_file(creds).secrets_for("globex") == [derived, own]  # no sender locked out


def test_sign_prints_a_header_that_verifies(creds: Path) -> None:
    code, out, _ = ingest("sign", "acme-corp", '{"a":1}', "--secret", "whsec_0123456789abcdef")
    assert code == 0
    name, _, value = out.strip().partition(": ")
    assert name == signing.HEADER
    assert signing.matches(signing.parse(value), ["whsec_0123456789abcdef"], b'{"a":1}')
    code, _, err = ingest("sign", "acme-corp", "{}")  # no secret anywhere
    assert code == 2 and "no signing secret" in " ".join(err.split())
