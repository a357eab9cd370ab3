"""One decision per request: who is calling (an Identity), or why not (a Refusal).

Operator endpoints take `Authorization: Bearer <token>`; the token's roles decide the action
(any role may read what `viewer` reads). Webhooks take a tenant signature (signing.py) or a
tenant API key as `Authorization: Bearer ik_...`, and a tenant's credential writes only to
that tenant. The webhook check runs in two steps so nothing is read or stored for a request
that can be refused from its headers alone:

    webhook_headers(tenant, headers)  -> WebhookCheck | Refusal   before the body is read
    webhook_body(check, body)         -> Identity | Refusal       before the body is stored
    release(check)                    the body was not accepted after all (429/503): forget it

Answers: 401 `missing_credential`, `malformed_credential`, `bad_credential`,
`expired_credential`, `bad_signature`, `expired_timestamp`, `replayed_signature`;
403 `wrong_tenant`, `missing_role` (and `tenant_scope`, decided by the endpoint).
With `auth: disabled` every request is the all-roles identity `anonymous`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ingest.auth import signing
from ingest.auth.credentials import Credentials, CredentialSource, Role
from ingest.auth.seen import SeenSignatures, request_key

_BEARER = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]{1,512}=*)$")
DOCS = "see docs/security.md"


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    via: str  # token | signature | api_key | auth-disabled | cli
    roles: frozenset[Role] = frozenset()
    tenants: frozenset[str] = frozenset({"*"})

    def may(self, role: Role) -> bool:
        return role in self.roles or (role is Role.VIEWER and bool(self.roles))

    def sees(self, tenant: str | None) -> bool:
        """May read/act on `tenant`'s data (None = every tenant at once)."""
        return "*" in self.tenants or (tenant is not None and tenant in self.tenants)


ANONYMOUS = Identity("anonymous", "auth-disabled", frozenset(Role), frozenset({"*"}))


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    error: str
    reason: str
    actor: str | None = None  # the token's name when it is valid but lacks the role (403)

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="ingest"'} if self.status == 401 else {}


@dataclass(slots=True)
class WebhookCheck:
    tenant: str
    header: signing.SignatureHeader | None = None
    identity: Identity | None = None  # decided from the headers alone (API key)
    seen_key: bytes | None = field(default=None)


_SECRETS_KEPT = 1024  # tenants whose secrets a Guard keeps (`Guard._secrets_for`)


def _unauthorized(error: str, reason: str) -> Refusal:
    return Refusal(401, error, reason)


class Guard:
    def __init__(
        self,
        source: CredentialSource | None,
        seen: SeenSignatures | None,
        *,
        tolerance_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`source` None means `auth: disabled`."""
        self.source = source
        self.seen = seen
        self.tolerance = tolerance_seconds
        self.clock = clock
        self._secrets: tuple[Credentials | None, dict[str, list[str]]] = (None, {})

    @property
    def disabled(self) -> bool:
        return self.source is None

    # ------------------------------------------------------------------ operators
    def admin(self, authorization: str | None, role: Role) -> Identity | Refusal:
        if self.source is None:
            return ANONYMOUS
        if not authorization:
            article = "an" if role.value[0] in "aeiou" else "a"  # an operator, an approver
            return _unauthorized(
                "missing_credential",
                f"this endpoint needs {article} {role.value} token: "
                f'-H "Authorization: Bearer $INGEST_TOKEN" ({DOCS})',
            )
        token = _bearer(authorization, "token")
        if isinstance(token, Refusal):
            return token
        entry = self.source.current().token(token)
        if entry is None:
            return _unauthorized("bad_credential", "the token is not valid (unknown or revoked)")
        if entry.expires is not None and entry.expires.timestamp() <= self.clock():
            return _unauthorized(
                "expired_credential",
                f"token '{entry.name}' expired at {entry.expires.isoformat()}; ask for a new one",
            )
        who = Identity(entry.name, "token", frozenset(entry.roles), frozenset(entry.tenants))
        if not who.may(role):
            return Refusal(
                403,
                "missing_role",
                f"token '{entry.name}' has roles {', '.join(r.value for r in entry.roles)}; "
                f"this endpoint needs {role.value}",
                actor=entry.name,
            )
        return who

    # ------------------------------------------------------------------ webhooks
    def webhook_headers(self, tenant: str, headers: Mapping[str, str]) -> WebhookCheck | Refusal:
        if self.source is None:
            return WebhookCheck(tenant, identity=ANONYMOUS)
        sig = headers.get(signing.HEADER.lower())
        if sig is not None:
            try:
                parsed = signing.parse(sig)
            except signing.MalformedSignature as exc:
                return _unauthorized("malformed_credential", str(exc))
            skew = abs(self.clock() - parsed.timestamp)
            if skew > self.tolerance:
                return _unauthorized(
                    "expired_timestamp",
                    f"the signature's t= is {skew:.0f} s away from the receiver's clock "
                    f"(tolerance {self.tolerance:.0f} s); sign again with the current time",
                )
            return WebhookCheck(tenant, header=parsed)
        authorization = headers.get("authorization")
        if not authorization:
            return _unauthorized(
                "missing_credential",
                f"sign the body ({signing.HEADER}: t=<unix time>,v1=<HMAC-SHA256 of "
                "'<t>.<body>'>) or send Authorization: Bearer <tenant API key> "
                f"({DOCS})",
            )
        key = _bearer(authorization, "API key")
        if isinstance(key, Refusal):
            return key
        owner = self.source.current().api_key_tenant(key)
        if owner is None:
            return _unauthorized("bad_credential", "the API key is not valid (unknown or revoked)")
        if owner != tenant:
            return _wrong_tenant(owner, tenant)
        return WebhookCheck(
            tenant, identity=Identity(tenant, "api_key", tenants=frozenset({tenant}))
        )

    async def webhook_body(self, check: WebhookCheck, body: bytes) -> Identity | Refusal:
        """Verify the signature over the raw body and reserve it against replays.

        Raises StoreUnavailable when the replay cache cannot be reached (the caller answers
        503: nothing was accepted)."""
        if check.identity is not None:
            return check.identity
        assert check.header is not None and self.source is not None
        header = check.header
        signer = header.key_id or check.tenant
        if not signing.matches(header, self._secrets_for(signer), body):
            return _unauthorized(
                "bad_signature",
                f"the signature does not match an active secret of tenant '{signer}' "
                "(HMAC-SHA256 over '<t>.' + the raw body, hex)",
            )
        if signer != check.tenant:
            return _wrong_tenant(signer, check.tenant)
        if self.seen is not None:
            key = request_key(check.tenant, header.timestamp, body)
            if not await self.seen.reserve(key, header.timestamp + self.tolerance + 1):
                return _unauthorized(
                    "replayed_signature",
                    "this exact signed request was already accepted; a new delivery needs a "
                    "new signature (current t=)",
                )
            check.seen_key = key
        return Identity(check.tenant, "signature", tenants=frozenset({check.tenant}))

    def _secrets_for(self, tenant: str) -> list[str]:
        """The tenant's active secrets, kept for the credentials snapshot they came from. A
        tenant without an entry of its own has its secret derived, an HMAC a request (~15 us
        at load 4, as much as Starlette's layers a request; docs/benchmarks.md, ctlloop2). A
        rotation is a new snapshot (`CredentialSource.reload`), so a rotated secret is refused
        from the same request as without the cache. At most `_SECRETS_KEPT` tenants (the
        signer is the sender's `kid`: any name)."""
        assert self.source is not None
        creds = self.source.current()
        of, kept = self._secrets
        if of is not creds:
            kept = {}
            self._secrets = (creds, kept)
        found = kept.get(tenant)
        if found is None:
            if len(kept) >= _SECRETS_KEPT:
                kept.clear()
            found = kept[tenant] = creds.secrets_for(tenant)
        return found

    async def release(self, check: WebhookCheck) -> None:
        if check.seen_key is not None and self.seen is not None:
            key, check.seen_key = check.seen_key, None
            await self.seen.release(key)


def _bearer(authorization: str, what: str) -> str | Refusal:
    m = _BEARER.match(authorization.strip())
    if m is None:
        return _unauthorized(
            "malformed_credential", f"the Authorization header must be 'Bearer <{what}>'"
        )
    return m.group(1)


def _wrong_tenant(owner: str, tenant: str) -> Refusal:
    return Refusal(
        403,
        "wrong_tenant",
        f"the credential belongs to tenant '{owner}' and cannot write to tenant '{tenant}'",
    )
