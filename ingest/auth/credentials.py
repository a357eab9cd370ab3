"""The credentials file: operator tokens (hashed), tenant webhook secrets and API keys (hashed).

One YAML document, from `auth.credentials_file` / `INGEST_CREDENTIALS_FILE` (a mounted
Secret) or inline in `INGEST_CREDENTIALS`; re-read when the file changes, so a rotated secret
takes effect without a restart:

    tokens:                        # operator/admin bearer tokens, only their SHA-256 kept
      - name: alice                # the identity the audit trail records
        roles: [viewer, operator]  # viewer | operator | approver
        tenants: ["*"]             # whose data it may read or act on ("*": all, and global
                                   # actions like drain); default "*"
        sha256: 9f86d0...          # `ingest auth new-token` prints the token once
        expires: 2026-06-30T00:00:00Z   # optional
    tenants:                       # webhook credentials per tenant
      acme-corp:
        secrets: [whsec_old, whsec_new]   # 1 or 2 active HMAC secrets (two while rotating)
        api_keys_sha256: [...]            # senders that cannot sign: Authorization: Bearer ik_...
    tenant_secret_keys: [whmk_...] # optional: a tenant without an entry signs with
                                   # derive_secret(key, tenant) (dev mode, first-party senders)

Tokens and API keys are 256-bit random strings, so one SHA-256 is the right hash (a slow
password hash buys nothing against a 2^256 search); HMAC secrets must be kept as they are,
since the receiver recomputes the signature. Pydantic `SecretStr` keeps them out of reprs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets as rnd
import stat
import time
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from ingest.auth.signing import NAME
from ingest.errors import ConfigError

log = logging.getLogger(__name__)

TOKEN_PREFIX = "ingt_"  # operator token
API_KEY_PREFIX = "ik_"  # tenant API key
SECRET_PREFIX = "whsec_"  # tenant signing secret
MASTER_PREFIX = "whmk_"  # tenant secret key (derivation)
ENV_FILE = "INGEST_CREDENTIALS_FILE"
ENV_INLINE = "INGEST_CREDENTIALS"
DEV_FILE = "credentials.yaml"
DEV_TOKEN_FILE = "admin-token"
_HEX64 = r"^[0-9a-f]{64}$"


class Role(StrEnum):
    VIEWER = "viewer"  # /health/detailed, DLQ reads, the audit trail
    OPERATOR = "operator"  # drain, pause, resume, brownout, redrive
    APPROVER = "approver"  # replay approvals


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenEntry(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
    roles: list[Role] = Field(min_length=1)
    tenants: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    sha256: str = Field(pattern=_HEX64)
    expires: datetime | None = None  # after this the token is refused (401 expired_credential)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, value: list[str]) -> list[str]:
        for t in value:
            if t != "*" and not NAME.match(t):
                raise ValueError(f"'{t}' is not a tenant name or '*'")
        return value


class TenantCredentials(_Model):
    secrets: list[SecretStr] = Field(default_factory=list, max_length=2)
    api_keys_sha256: list[str] = Field(default_factory=list)

    @field_validator("secrets")
    @classmethod
    def _long_enough(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(len(s.get_secret_value()) < 16 for s in value):
            raise ValueError("each secret needs at least 16 characters")
        return value

    @field_validator("api_keys_sha256")
    @classmethod
    def _hashes(cls, value: list[str]) -> list[str]:
        if any(len(h) != 64 or h.strip("0123456789abcdef") for h in value):
            raise ValueError("api_keys_sha256 holds SHA-256 hex digests (64 lowercase hex)")
        return value


class Credentials(_Model):
    tokens: list[TokenEntry] = Field(default_factory=list)
    tenants: dict[str, TenantCredentials] = Field(default_factory=dict)
    tenant_secret_keys: list[SecretStr] = Field(default_factory=list, max_length=2)

    @field_validator("tenants")
    @classmethod
    def _tenant_keys(cls, value: dict[str, TenantCredentials]) -> dict[str, TenantCredentials]:
        for t in value:
            if not NAME.match(t):
                raise ValueError(f"'{t}' is not a tenant name")
        return value

    @field_validator("tenant_secret_keys")
    @classmethod
    def _keys_long_enough(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(len(s.get_secret_value()) < 16 for s in value):
            raise ValueError("each key needs at least 16 characters")
        return value

    @property
    def empty(self) -> bool:
        return not (self.tokens or self.tenants or self.tenant_secret_keys)

    def token(self, presented: str) -> TokenEntry | None:
        """The entry whose hash is the presented token's; every entry is compared."""
        digest = sha256_hex(presented)
        found: TokenEntry | None = None
        for entry in self.tokens:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found

    def secrets_for(self, tenant: str) -> list[str]:
        """A tenant's active signing secrets: its own entry's, else derived from the keys."""
        entry = self.tenants.get(tenant)
        if entry is not None:
            return [s.get_secret_value() for s in entry.secrets]
        return [derive_secret(k.get_secret_value(), tenant) for k in self.tenant_secret_keys]

    def api_key_tenant(self, presented: str) -> str | None:
        digest = sha256_hex(presented)
        found: str | None = None
        for tenant, entry in self.tenants.items():
            for h in entry.api_keys_sha256:
                if hmac.compare_digest(h, digest):
                    found = tenant
        return found


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def derive_secret(key: str, tenant: str) -> str:
    """Tenant `tenant`'s signing secret under a tenant secret key; useless for any other."""
    mac = hmac.new(key.encode(), b"ingest-tenant-secret:" + tenant.encode(), hashlib.sha256)
    return SECRET_PREFIX + mac.hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + rnd.token_urlsafe(32)


def new_api_key() -> str:
    return API_KEY_PREFIX + rnd.token_urlsafe(32)


def new_secret(prefix: str = SECRET_PREFIX) -> str:
    return prefix + rnd.token_urlsafe(32)


def parse(text: str, where: str) -> Credentials:
    """Validate a credentials document; errors name the key, never a value."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(where, "credentials are not valid YAML") from None
    try:
        return Credentials.model_validate(raw or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise ConfigError(f"{where}: {loc}", err["msg"]) from None


def dump(creds: Credentials) -> str:
    doc: dict[str, Any] = creds.model_dump(mode="json", exclude_defaults=True)
    # SecretStr dumps as '**********' in json mode: write the real values back
    for tenant, entry in creds.tenants.items():
        if entry.secrets:
            doc["tenants"][tenant]["secrets"] = [s.get_secret_value() for s in entry.secrets]
    if creds.tenant_secret_keys:
        doc["tenant_secret_keys"] = [k.get_secret_value() for k in creds.tenant_secret_keys]
    header = "# ingest credentials: keep this file secret (mode 0600); docs/security.md\n"
    return header + yaml.safe_dump(doc, sort_keys=False)


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only, replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_file(path: Path) -> Credentials:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read credentials: {exc.strerror}") from None
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and mode & stat.S_IRWXO:
        log.warning(
            "credentials file %s is readable by others (mode %o): chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    return parse(text, str(path))


class CredentialSource:
    """The current credentials, re-read (at most once a second) when the file changes.

    A file that turns invalid keeps the last good credentials and says so in `error` (shown by
    /health/detailed), so a bad edit cannot lock everyone out or open the door.
    """

    def __init__(self, creds: Credentials, path: Path | None = None, origin: str = "") -> None:
        self._creds = creds
        self.path = path
        self.origin = origin or (str(path) if path else "inline")
        self.error: str | None = None
        self._stamp = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> Credentials:
        if self.path is not None and time.monotonic() - self._checked >= 1.0:
            self.reload()
        return self._creds

    def reload(self) -> None:
        self._checked = time.monotonic()
        stamp = self._stat()
        if stamp == self._stamp or self.path is None:
            return
        self._stamp = stamp
        try:
            self._creds = read_file(self.path)
        except ConfigError as exc:
            self.error = f"{exc} (keeping the credentials loaded before)"
            log.error("credentials reload failed: %s", self.error)
            return
        self.error = None
        log.warning("credentials reloaded from %s", self.path)

    def health(self) -> dict[str, Any]:
        creds = self._creds
        return {
            "source": self.origin,
            "tokens": len(creds.tokens),
            "tenants": len(creds.tenants),
            "tenant_secret_keys": len(creds.tenant_secret_keys),
            "error": self.error,
        }


def configured(credentials_file: Path | None) -> CredentialSource | None:
    """The configured credentials (file, else inline env), or None when there are none."""
    inline = os.environ.get(ENV_INLINE)
    path = credentials_file  # config, or INGEST_CREDENTIALS_FILE through the config's overrides
    if path is not None and inline:
        raise ConfigError(ENV_INLINE, f"set either a credentials file or {ENV_INLINE}, not both")
    if path is not None:
        return CredentialSource(read_file(path), path)
    if inline:
        return CredentialSource(parse(inline, ENV_INLINE), origin=f"env {ENV_INLINE}")
    return None


def dev_credentials(data_dir: Path) -> tuple[CredentialSource, str | None]:
    """Embedded mode without configured credentials: `<data_dir>/credentials.yaml` (made on
    first start: one all-roles token and a tenant secret key) and the token itself in
    `<data_dir>/admin-token`, both mode 0600. Returns the source and the token (if readable)."""
    path = data_dir / DEV_FILE
    token_path = data_dir / DEV_TOKEN_FILE
    if not path.exists():
        fresh = new_token()
        creds = Credentials(
            tokens=[
                TokenEntry(name="dev-admin", roles=list(Role), sha256=sha256_hex(fresh)),
            ],
            tenant_secret_keys=[SecretStr(new_secret(MASTER_PREFIX))],
        )
        write_private(token_path, fresh + "\n")
        write_private(path, dump(creds))
        log.warning("generated dev credentials in %s (admin token in %s)", path, token_path)
    try:
        token: str | None = token_path.read_text().strip() or None
    except OSError:
        token = None
    return CredentialSource(read_file(path), path), token
