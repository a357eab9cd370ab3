"""Which credentials a starting service uses, and the secure default when none are given.

auth: disabled            -> no checks; the log warns and /health/detailed says so
a credentials file / env  -> those (production and embedded alike)
nothing, embedded mode    -> dev credentials generated in the data dir (printed at start)
nothing, production mode  -> refuse to start (ConfigError, exit 2)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ingest import config as C
from ingest.auth import credentials
from ingest.auth.credentials import CredentialSource
from ingest.auth.guard import Guard
from ingest.auth.seen import RedisSeen, SeenSignatures, SQLiteSeen
from ingest.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AuthSetup:
    source: CredentialSource | None  # None = auth: disabled
    dev: bool = False  # generated dev credentials (embedded mode, nothing configured)

    def health(self) -> dict[str, Any]:
        if self.source is None:
            return {
                "mode": "disabled",
                "warning": "auth: disabled - anyone who reaches the "
                "service may post into any tenant and call /admin/*",
            }
        return {"mode": "dev" if self.dev else "enabled", **self.source.health()}


def load(cfg: C.Config) -> AuthSetup:
    """Decide before anything is opened, so a refused start leaves nothing behind."""
    if cfg.auth.disabled:
        log.warning(
            "auth: disabled - webhooks and /admin/* accept every request without a credential"
        )
        return AuthSetup(None)
    source = credentials.configured(cfg.auth.credentials_file)
    if source is not None:
        return AuthSetup(source)
    if isinstance(cfg.state, C.SQLiteStateConfig):
        source, _ = credentials.dev_credentials(cfg.data_dir)
        return AuthSetup(source, dev=True)
    raise ConfigError(
        "auth",
        "production mode needs credentials: set auth.credentials_file or "
        f"{credentials.ENV_FILE} (or {credentials.ENV_INLINE}); see docs/security.md. "
        "To run without any authentication say `auth: disabled` explicitly",
    )


def seen_store(stores: Any) -> SeenSignatures:
    """Where accepted signatures are remembered: next to the other state every worker shares."""
    if stores.sqlite_db is not None:
        return SQLiteSeen(stores.sqlite_db)
    return RedisSeen(stores.redis)


def guard(cfg: C.Config, setup: AuthSetup, stores: Any) -> Guard:
    if setup.source is None:
        return Guard(None, None)
    return Guard(setup.source, seen_store(stores), tolerance_seconds=cfg.auth.tolerance_seconds)


def banner(cfg: C.Config, base: str, record: str) -> tuple[list[str], list[str]]:
    """What `ingest run` prints about auth: (how to call operator endpoints, how to post).

    In dev mode the generated token and tenant acme-corp's signing secret are printed: this
    machine's own credentials, in a 0600 file under the data dir already."""
    if cfg.auth.disabled:
        return ["  auth:     DISABLED (auth: disabled) - anyone who reaches it may do anything"], [
            f"    curl -s -X POST {base}/v1/webhooks/acme-corp/orders "
            f"-H 'Content-Type: application/json' -d '{record}'"
        ]
    hdr = '-H "Authorization: Bearer $INGEST_TOKEN"'
    ops = [f"  health:   curl -s {hdr} {base}/health/detailed | jq"]
    if cfg.http.admin_port is not None:
        where = f"{cfg.http.admin_host or cfg.http.host}:{cfg.http.admin_port}"
        ops.append(f"  admin:    /admin/* only on http://{where} (http.admin_port)")
    post = [f"    ingest post acme-corp/orders '{record}'   (signs with INGEST_WEBHOOK_SECRET)"]
    dev = cfg.data_dir / credentials.DEV_FILE
    if credentials.configured(cfg.auth.credentials_file) is not None or not dev.exists():
        return ["  auth:     operator calls need a token: export INGEST_TOKEN=...", *ops], post
    try:
        token = (cfg.data_dir / credentials.DEV_TOKEN_FILE).read_text().strip()
        secret = credentials.read_file(dev).secrets_for("acme-corp")[-1]
    except (OSError, ConfigError, IndexError):
        return [f"  auth:     dev credentials in {dev.resolve()}", *ops], post
    ops = [
        f"  auth:     dev credentials in {dev.resolve()} (mode 0600, docs/security.md)",
        f"  token:    export INGEST_TOKEN={token}",
        *ops,
    ]
    post = [
        f"    ingest post acme-corp/orders '{record}'",
        "  or with curl and openssl (acme-corp's signing secret):",
        f"    body='{record}'",
        f'    ts=$(date +%s); sig=$(printf \'%s.%s\' "$ts" "$body" | openssl dgst -sha256 '
        f"-hmac '{secret}' | cut -d' ' -f2)",
        f"    curl -s -X POST {base}/v1/webhooks/acme-corp/orders "
        "-H \"X-Ingest-Signature: t=$ts,v1=$sig\" -H 'Content-Type: application/json' "
        '-d "$body"',
    ]
    return ops, post
