"""The request guard: tenant webhooks (signature, API key), operator tokens and roles."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.auth import credentials as C
from ingest.auth import signing
from ingest.auth.guard import Guard, Identity, Refusal, WebhookCheck
from ingest.auth.seen import MemorySeen

NOW = 1_800_000_000.0
KEY = "whmk_tenant-secret-key-0123456789"
ACME_OLD, ACME_NEW = "whsec_acme-old-0123456789", "whsec_acme-new-0123456789"
ACME_API_KEY = "ik_acme-api-key-0123456789abcdef"
TOKENS = {r: f"ingt_token-for-{r}-0123456789" for r in ("viewer", "operator", "approver", "all")}


def creds(acme_secrets: tuple[str, ...] = (ACME_OLD, ACME_NEW)) -> C.Credentials:
    return C.Credentials.model_validate(
        {
            "tokens": [
                {
                    "name": name,
                    "roles": list(C.Role) if name == "all" else [name],
                    "sha256": C.sha256_hex(tok),
                }
                for name, tok in TOKENS.items()
            ],
            "tenants": {
                "acme-corp": {
                    "secrets": list(acme_secrets),
                    "api_keys_sha256": [C.sha256_hex(ACME_API_KEY)],
                },
                "globex": {"secrets": ["whsec_globex-0123456789ab"]},
            },
            "tenant_secret_keys": [KEY],
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def guard(c: C.Credentials | None = None, clock: Clock | None = None) -> Guard:
    clock = clock or Clock()
    return Guard(
        C.CredentialSource(c or creds()), MemorySeen(clock), tolerance_seconds=300, clock=clock
    )


def secret_of(tenant: str) -> str:
    return creds().secrets_for(tenant)[0]


def signed(
    tenant_secret: str, body: bytes, ts: float = NOW, kid: str | None = None
) -> dict[str, str]:
    return {
        signing.HEADER.lower(): signing.header_value(
            [tenant_secret], body, timestamp=int(ts), key_id=kid
        )
    }


async def webhook(
    g: Guard, tenant: str, headers: Mapping[str, str], body: bytes
) -> Identity | Refusal:
    check = g.webhook_headers(tenant, {k.lower(): v for k, v in headers.items()})
    if isinstance(check, Refusal):
        return check
    return await g.webhook_body(check, body)


def refused(result: Identity | Refusal, status: int, error: str) -> None:
    assert isinstance(result, Refusal), result
    assert (result.status, result.error) == (status, error), result
    assert result.reason
    assert ("WWW-Authenticate" in result.headers) == (status == 401)


BODY = b'{"schema_version":3}'


# ------------------------------------------------------------------------------ webhooks
async def test_valid_signature_of_the_tenant_is_accepted() -> None:
    g = guard()
    who = await webhook(g, "acme-corp", signed(ACME_NEW, BODY), BODY)
    assert who == Identity("acme-corp", "signature", tenants=frozenset({"acme-corp"}))
    derived = await webhook(g, "initech", signed(secret_of("initech"), BODY), BODY)
    assert isinstance(derived, Identity) and derived.name == "initech"


@pytest.mark.parametrize(
    ("case", "status", "error"),
    [
        ("no credential", 401, "missing_credential"),
        ("wrong credential", 401, "bad_signature"),
        ("other tenant's credential", 403, "wrong_tenant"),
        ("other tenant's credential, no kid", 401, "bad_signature"),
        ("other tenant's API key", 403, "wrong_tenant"),
        ("unknown API key", 401, "bad_credential"),
        ("expired timestamp", 401, "expired_timestamp"),
        ("future timestamp", 401, "expired_timestamp"),
        ("replayed signature", 401, "replayed_signature"),
        ("malformed header", 401, "malformed_credential"),
        ("malformed authorization", 401, "malformed_credential"),
        ("signature of another body", 401, "bad_signature"),
        ("derived secret of another tenant", 403, "wrong_tenant"),
    ],
)
async def test_webhook_refusals(case: str, status: int, error: str) -> None:
    g = guard()
    tenant = "globex"
    headers: dict[str, str] = {
        "no credential": {},
        "wrong credential": signed("whsec_not-a-real-secret-000", BODY),
        "other tenant's credential": signed(ACME_NEW, BODY, kid="acme-corp"),
        "other tenant's credential, no kid": signed(ACME_NEW, BODY),
        "other tenant's API key": {"authorization": f"Bearer {ACME_API_KEY}"},
        "unknown API key": {"authorization": "Bearer ik_unknown-key-0123456789"},
        "expired timestamp": signed(secret_of(tenant), BODY, ts=NOW - 301),
        "future timestamp": signed(secret_of(tenant), BODY, ts=NOW + 301),
        "replayed signature": signed(secret_of(tenant), BODY),
        "malformed header": {signing.HEADER.lower(): "t=now,v1=xyz"},
        "malformed authorization": {"authorization": "Basic dXNlcjpwYXNz"},
        "signature of another body": signed(secret_of(tenant), BODY + b" "),
        "derived secret of another tenant": signed(secret_of("initech"), BODY, kid="initech"),
    }[case]
    if case == "replayed signature":
        assert isinstance(await webhook(g, tenant, headers, BODY), Identity)
    refused(await webhook(g, tenant, headers, BODY), status, error)


async def test_api_key_writes_only_its_tenant() -> None:
    g = guard()
    headers = {"authorization": f"Bearer {ACME_API_KEY}"}
    who = await webhook(g, "acme-corp", headers, BODY)
    assert who == Identity("acme-corp", "api_key", tenants=frozenset({"acme-corp"}))
    refused(await webhook(g, "globex", headers, BODY), 403, "wrong_tenant")
    # an operator token is no tenant credential
    refused(
        await webhook(g, "acme-corp", {"authorization": f"Bearer {TOKENS['all']}"}, BODY),
        401,
        "bad_credential",
    )


async def test_window_edges_and_release_after_a_refused_body() -> None:
    clock = Clock()
    g = guard(clock=clock)
    assert isinstance(
        await webhook(g, "globex", signed(secret_of("globex"), BODY, NOW - 300), BODY), Identity
    )
    # accepted, then not made durable (429/503): released, so the same request may come again
    headers = signed(secret_of("globex"), b"[2]")
    check = g.webhook_headers("globex", headers)
    assert isinstance(check, WebhookCheck)
    assert isinstance(await g.webhook_body(check, b"[2]"), Identity)
    await g.release(check)
    assert isinstance(await webhook(g, "globex", headers, b"[2]"), Identity)
    refused(await webhook(g, "globex", headers, b"[2]"), 401, "replayed_signature")
    # the same body signed with the other secret at the same second is the same request
    both = signing.header_value([ACME_OLD], BODY, timestamp=int(NOW))
    assert isinstance(await webhook(g, "acme-corp", {signing.HEADER: both}, BODY), Identity)
    other = signing.header_value([ACME_NEW], BODY, timestamp=int(NOW))
    refused(await webhook(g, "acme-corp", {signing.HEADER: other}, BODY), 401, "replayed_signature")
    # ... and past the window it is refused as expired, not accepted again
    clock.now += 302
    refused(await webhook(g, "acme-corp", {signing.HEADER: other}, BODY), 401, "expired_timestamp")


async def test_key_rotation_with_two_secrets() -> None:
    """old only -> old + new (senders switch, both accepted) -> new only (old refused)."""
    source = C.CredentialSource(creds((ACME_OLD,)))
    clock = Clock()
    g = Guard(source, MemorySeen(clock), clock=clock)

    async def ok(secret: str, body: bytes) -> bool:
        return isinstance(await webhook(g, "acme-corp", signed(secret, body), body), Identity)

    assert await ok(ACME_OLD, b"[1]") and not await ok(ACME_NEW, b"[2]")
    source._creds = creds((ACME_OLD, ACME_NEW))
    assert await ok(ACME_OLD, b"[3]") and await ok(ACME_NEW, b"[4]")
    source._creds = creds((ACME_NEW,))
    assert not await ok(ACME_OLD, b"[5]") and await ok(ACME_NEW, b"[6]")


async def test_auth_disabled_lets_everything_through_as_anonymous() -> None:
    g = Guard(None, None)
    who = await webhook(g, "acme-corp", {}, BODY)
    assert isinstance(who, Identity) and who.via == "auth-disabled"
    assert g.admin(None, C.Role.OPERATOR) == who


# ------------------------------------------------------------------------------ operators
@pytest.mark.parametrize("role", list(C.Role))
def test_roles(role: C.Role) -> None:
    g = guard()
    for name, token in TOKENS.items():
        result = g.admin(f"Bearer {token}", role)
        allowed = name in (role.value, "all") or role is C.Role.VIEWER
        if allowed:
            assert isinstance(result, Identity) and result.name == name and result.via == "token"
        else:
            refused(result, 403, "missing_role")


@pytest.mark.parametrize(
    ("authorization", "error"),
    [
        (None, "missing_credential"),
        ("", "missing_credential"),
        ("Bearer", "malformed_credential"),
        ("Token abc", "malformed_credential"),
        ("Bearer a b", "malformed_credential"),
        ("Bearer ingt_wrong-token-0123456789", "bad_credential"),
        (f"Bearer {ACME_API_KEY}", "bad_credential"),  # a tenant's API key is no operator token
        (f"bearer  {TOKENS['operator']}x", "bad_credential"),
    ],
)
def test_admin_refusals(authorization: str | None, error: str) -> None:
    refused(guard().admin(authorization, C.Role.OPERATOR), 401, error)


# ------------------------------------------------------------------------------ fuzz
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\t é"),
    max_size=200,
)


def sig_like() -> st.SearchStrategy[str]:
    item = st.one_of(
        st.builds(lambda n: f"t={n}", st.integers(-10, 2 * 10**12)),
        st.builds(
            lambda h: f"v1={h}", st.text("0123456789abcdefABCDEFxyz", min_size=60, max_size=66)
        ),
        st.builds(lambda k: f"kid={k}", st.sampled_from(["acme-corp", "globex", "", "A B"])),
        header_text,
    )
    return st.lists(item, max_size=8).map(",".join)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    tenant=st.sampled_from(["acme-corp", "globex", "initech"]),
    signature=st.none() | sig_like() | header_text,
    authorization=st.none() | header_text | st.builds(lambda t: f"Bearer {t}", header_text),
    body=st.binary(max_size=64),
)
def test_fuzzed_auth_headers_never_pass_and_never_crash(
    tenant: str, signature: str | None, authorization: str | None, body: bytes
) -> None:
    g = guard()
    headers = {}
    if signature is not None:
        headers[signing.HEADER.lower()] = signature
    if authorization is not None:
        headers["authorization"] = authorization
    result = asyncio.run(webhook(g, tenant, headers, body))
    assert isinstance(result, Refusal) and result.status in (401, 403) and result.reason
    admin = g.admin(authorization, C.Role.VIEWER)
    assert isinstance(admin, Refusal) and admin.status == 401


# ------------------------------------------------------------------------------ isolation
tenants = st.sampled_from(["acme-corp", "globex", "initech", "umbrella"])


@settings(max_examples=300)
@given(
    owner=tenants, target=tenants, body=st.binary(max_size=64), kid=st.booleans(), api=st.booleans()
)
def test_no_tenant_credential_writes_another_tenant(
    owner: str, target: str, body: bytes, kid: bool, api: bool
) -> None:
    g = guard()
    if api and owner == "acme-corp":
        headers = {"authorization": f"Bearer {ACME_API_KEY}"}
    else:
        headers = signed(secret_of(owner), body, kid=owner if kid else None)
    result = asyncio.run(webhook(g, target, headers, body))
    if owner == target:
        assert isinstance(result, Identity) and result.name == target
        assert result.sees(target) and not result.may(C.Role.VIEWER)
    else:
        assert isinstance(result, Refusal) and result.status in (401, 403)


def test_expired_token_is_refused() -> None:
    clock = Clock()
    c = C.Credentials.model_validate(
        {
            "tokens": [
                {
                    "name": "temp",
                    "roles": ["operator"],
                    "sha256": C.sha256_hex(TOKENS["operator"]),
                    "expires": "2027-01-15T00:00:00Z",
                }
            ]
        }
    )
    g = Guard(C.CredentialSource(c), MemorySeen(clock), clock=clock)
    clock.now = 1_800_000_000.0  # 2027-01-15T08:00Z: past it
    refused(g.admin(f"Bearer {TOKENS['operator']}", C.Role.OPERATOR), 401, "expired_credential")
    clock.now = 1_700_000_000.0  # 2023: before it
    assert isinstance(g.admin(f"Bearer {TOKENS['operator']}", C.Role.OPERATOR), Identity)


async def test_a_derived_secret_is_kept_per_snapshot_and_a_rotated_key_refused_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tenant without an entry signs with a secret derived from the tenant secret keys: an
    HMAC a request until kept (`Guard._secrets_for`). The snapshot a rotation makes drops what
    was kept: the old key's secret is refused from the first request after it."""
    derived: list[str] = []
    derive = C.derive_secret
    monkeypatch.setattr(C, "derive_secret", lambda k, t: derived.append(t) or derive(k, t))
    new_key = "whmk_tenant-secret-key-rotated-01"
    source = C.CredentialSource(creds())
    clock = Clock()
    g = Guard(source, MemorySeen(clock), clock=clock)

    async def ok(key: str, body: bytes) -> bool:
        secret = derive(key, "initech")
        return isinstance(await webhook(g, "initech", signed(secret, body), body), Identity)

    assert await ok(KEY, b"[1]") and await ok(KEY, b"[2]") and not await ok(new_key, b"[3]")
    assert derived == ["initech"]  # derived once, not a request
    source._creds = creds().model_copy(update={"tenant_secret_keys": [C.SecretStr(new_key)]})
    assert not await ok(KEY, b"[4]") and await ok(new_key, b"[5]")
    assert derived == ["initech", "initech"]


async def test_the_kept_secrets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ingest.auth.guard._SECRETS_KEPT", 3)
    g = guard()
    for i in range(10):
        body = f"[{i}]".encode()
        tenant = f"t{i}"
        secret = C.derive_secret(KEY, tenant)
        assert isinstance(await webhook(g, tenant, signed(secret, body), body), Identity)
        assert len(g._secrets[1]) <= 3
