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
