"""Authentication at the service's boundary, driven as a stranger, a tenant and an operator would.

Every authenticated endpoint x {no credential, wrong credential, other tenant's credential,
expired timestamp/token, replayed signature, malformed header} gets its documented status and a
JSON `{error, reason}`, and changes nothing: no intake row, no seen signature, no sink row, no DLQ
change, no plan change, the same backpressure state, and no audit row — except the one `denied`
row a *valid* token leaves when it is used beyond its tenant scope (docs/security.md).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.auth import credentials as C
from ingest.auth import signing
from tests.conftest import v3_body
from tests.e2e._auth import TOKENS as HARNESS_TOKENS
from tests.e2e._service import ServiceProcess

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
ACME, GLOBEX, INITECH = "acme-corp", "globex", "initech"
SECRETS = {
    ACME: ["whsec_acme-old-0123456789abcdef", "whsec_acme-new-0123456789abcdef"],
    GLOBEX: ["whsec_globex-0123456789abcdef"],
    INITECH: ["whsec_initech-0123456789abcdef"],
}
API_KEY = {ACME: "ik_acme-0123456789abcdef0123456789"}
#              name: (roles, tenants)
TOKEN_SPECS: dict[str, tuple[list[str], list[str]]] = {
    "ops-admin": (["viewer", "operator", "approver"], ["*"]),
    "viewer": (["viewer"], ["*"]),
    "operator": (["operator"], ["*"]),
    "acme-ops": (["viewer", "operator", "approver"], [ACME]),
    "globex-ops": (["viewer", "operator", "approver"], [GLOBEX]),
    "expired": (["viewer", "operator", "approver"], ["*"]),
}
TOKENS = {name: C.new_token() for name in TOKEN_SPECS}


def write_credentials(path: Path) -> Path:
    harness = {
        "name": "test-admin",
        "roles": ["viewer", "operator", "approver"],
        "sha256": C.sha256_hex(HARNESS_TOKENS["admin"]),
    }  # svc.health(), svc.admin()
    doc: dict[str, Any] = {
        "tokens": [
            {
                "name": name,
                "roles": roles,
                "tenants": tenants,
                "sha256": C.sha256_hex(TOKENS[name]),
                **({"expires": "2020-01-01T00:00:00Z"} if name == "expired" else {}),
            }
            for name, (roles, tenants) in TOKEN_SPECS.items()
        ]
        + [harness],
        "tenants": {
            t: {
                "secrets": s,
                **({"api_keys_sha256": [C.sha256_hex(API_KEY[t])]} if t in API_KEY else {}),
            }
            for t, s in SECRETS.items()
        },
    }
    C.write_private(path, yaml.safe_dump(doc))
    return path


def record(tenant: str, eid: str, revision: Any = 1, **extra: Any) -> dict[str, Any]:
    return v3_body(tenant, "order", eid, revision, attributes={"n": 1}, **extra)


def signed(
    tenant: str,
    body: bytes,
    *,
    secret: str | None = None,
    ts: int | None = None,
    kid: str | None = None,
) -> dict[str, str]:
    value = signing.header_value([secret or SECRETS[tenant][-1]], body, timestamp=ts, key_id=kid)
    return {signing.HEADER: value, "Content-Type": "application/json"}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


@dataclass
class Env:
    svc: ServiceProcess
    creds: Path
    plan: str  # a pending replay plan of acme-corp, written by alice
    captured: tuple[bytes, dict[str, str]]  # a signed request acme-corp sent (accepted)

    @property
    def state(self) -> Path:
        return self.svc.data_dir / "state.db"

    def snapshot(self) -> dict[str, Any]:
        """Everything a request could change."""
        with sqlite3.connect(self.state, timeout=10) as c:
            q = lambda sql: c.execute(sql).fetchall()  # noqa: E731
            state = {
                "intake_seq": q("SELECT seq FROM sqlite_sequence WHERE name = 'intake'"),
                "seen": q("SELECT count(*) FROM seen_signatures"),
                "dlq": q("SELECT id, attempts FROM dlq ORDER BY id"),
                "plans": q("SELECT id, state, doc FROM replay_plans ORDER BY id"),
                "audit": q("SELECT count(*) FROM audit_log")[0][0],
            }
        with sqlite3.connect(self.svc.data_dir / "sink.db", timeout=10) as c:
            state["sink"] = c.execute("SELECT count(*) FROM entities").fetchall()
        state["backpressure"] = self.svc.health()["backpressure"]["state"]  # not audited
        return state

    def wait_idle(self) -> None:
        # queue_depth counts the webhook intake as of its last look (every 0.5 s): right
        # after a 202 it can still say 0; intake.records counts what was accepted since too
        deadline = time.monotonic() + 60
        while (bp := self.svc.health()["backpressure"])["queue_depth"] or bp["intake"]["records"]:
            assert time.monotonic() < deadline, "service did not go idle"
            time.sleep(0.2)
        time.sleep(0.5)


def replayctl(svc: ServiceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "replayctl"), *args],
        env=svc.env,
        cwd=svc.data_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("security")
    creds = write_credentials(root / "credentials.yaml")
    svc = ServiceProcess(
        root / "data", auth=False, env={"INGEST_CREDENTIALS_FILE": str(creds)}
    ).start()
    try:
        for tenant in (ACME, GLOBEX):  # one valid record and one DLQ entry per tenant
            for rec in (record(tenant, "o-1"), record(tenant, "bad", revision="one")):
                body = json.dumps(rec).encode()
                r = httpx.post(
                    f"{svc.url}/v1/webhooks/{tenant}/orders",
                    content=body,
                    headers=signed(tenant, body),
                )
                assert r.status_code == 202, r.text
        out = replayctl(
            svc,
            "plan",
            "--tenant",
            ACME,
            "--from",
            "2025-01-01T00:00:00Z",
            "--to",
            "2025-01-02T00:00:00Z",
            "--sources",
            "inbox-dropped",
            "--as",
            "alice",
            "--json",
        )
        assert out.returncode == 0, out.stderr
        e = Env(svc, creds, json.loads(out.stdout)["id"], (b"", {}))
        capture(e)
        yield e
    finally:
        svc.stop()


# ------------------------------------------------------------------------------ the matrix
def endpoints(e: Env) -> list[tuple[str, str]]:
    return [
        ("POST", f"/v1/webhooks/{ACME}/orders"),
        ("GET", "/health/detailed"),
        ("POST", "/admin/drain"),
        ("POST", "/admin/pause"),
        ("POST", "/admin/resume"),
        ("POST", "/admin/brownout?rate=0.5"),
        ("GET", f"/admin/dlq/summary?tenant={ACME}"),
        ("GET", f"/admin/dlq/sample?tenant={ACME}&full=1"),
        ("POST", f"/admin/dlq/redrive?tenant={ACME}&reason=VALIDATION_FAIL&force=1"),
        ("GET", f"/admin/replay?tenant={ACME}"),
        ("POST", f"/admin/replay/{e.plan}/approve?rfa=RFA-1"),
        ("GET", f"/admin/audit?tenant={ACME}"),
    ]


CASES = [
    "no credential",
    "wrong credential",
    "other tenant's credential",
    "expired",
    "replayed signature",
    "malformed header",
]


def attempt(e: Env, case: str, webhook: bool) -> tuple[bytes, dict[str, str], int, str]:
    """(body, headers, expected status, expected error) of one hostile request."""
    body, captured = e.captured if case == "replayed signature" else (b"[]", {})
    if not webhook:
        return {
            "no credential": (body, {}, 401, "missing_credential"),
            "wrong credential": (
                body,
                {"Authorization": f"Bearer {C.new_token()}"},
                401,
                "bad_credential",
            ),
            "other tenant's credential": (body, bearer("globex-ops"), 403, "tenant_scope"),
            "expired": (body, bearer("expired"), 401, "expired_credential"),
            # a tenant's signature or API key never authenticates an operator
            "replayed signature": (body, captured, 401, "missing_credential"),
            "malformed header": (
                body,
                {"Authorization": "Basic b3BzOnNlY3JldA=="},
                401,
                "malformed_credential",
            ),
        }[case]
    body = json.dumps(record(ACME, "hostile")).encode() if case != "replayed signature" else body
    return {
        "no credential": (body, {"Content-Type": "application/json"}, 401, "missing_credential"),
        "wrong credential": (
            body,
            signed(ACME, body, secret="whsec_guessed-0123456789abcdef"),
            401,
            "bad_signature",
        ),
        "other tenant's credential": (body, signed(GLOBEX, body, kid=GLOBEX), 403, "wrong_tenant"),
        "expired": (body, signed(ACME, body, ts=int(time.time()) - 301), 401, "expired_timestamp"),
        "replayed signature": (body, captured, 401, "replayed_signature"),
        "malformed header": (body, {signing.HEADER: "t=now,v1=abc"}, 401, "malformed_credential"),
    }[case]


def capture(e: Env) -> None:
    """A request acme-corp just sent and had accepted: what an eavesdropper would replay."""
    body = json.dumps(record(ACME, f"c-{time.monotonic_ns()}")).encode()
    headers = signed(ACME, body)
    r = httpx.post(f"{e.svc.url}/v1/webhooks/{ACME}/orders", content=body, headers=headers)
    assert r.status_code == 202, r.text
    e.captured = (body, headers)
    e.wait_idle()


@pytest.mark.parametrize("case", CASES)
def test_every_endpoint_refuses_and_changes_nothing(env: Env, case: str) -> None:
    if case == "replayed signature":
        capture(env)  # fresh, so it is inside the tolerance window when replayed
    for method, path in endpoints(env):
        webhook = path.startswith("/v1/webhooks")
        body, headers, status, error = attempt(env, case, webhook)
        before = env.snapshot()
        r = httpx.request(method, f"{env.svc.url}{path}", content=body, headers=headers, timeout=30)
        assert r.status_code == status, (case, method, path, r.status_code, r.text)
        doc = r.json()
        assert doc["error"] == error and doc["reason"], (case, path, doc)
        if status == 401:
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        after = env.snapshot()
        if status == 403 and not webhook:  # a valid token beyond its scope: one `denied` row
            assert after.pop("audit") == before.pop("audit") + 1, (case, path)
        assert after == before, (case, method, path)


def test_open_endpoints_stay_open(env: Env) -> None:
    for path in ("/health/live", "/metrics"):
        assert httpx.get(f"{env.svc.url}{path}", timeout=10).status_code == 200, path
    m = httpx.get(f"{env.svc.url}/metrics", timeout=10).text
    assert 'ingest_auth_failures_total{error="missing_credential",surface="webhook"}' in m


def test_roles(env: Env) -> None:
    url = env.svc.url
    r = httpx.post(f"{url}/admin/drain", headers=bearer("viewer"), timeout=10)
    assert r.status_code == 403 and r.json()["error"] == "missing_role"
    assert (
        httpx.get(f"{url}/health/detailed", headers=bearer("operator"), timeout=10).status_code
        == 200
    )
    r = httpx.post(f"{url}/admin/replay/{env.plan}/approve", headers=bearer("operator"), timeout=10)
    assert r.status_code == 403 and r.json()["error"] == "missing_role"
    r = httpx.get(f"{url}/admin/dlq/sample?tenant={ACME}", headers=bearer("acme-ops"), timeout=10)
    assert r.status_code == 200 and {e["tenant"] for e in r.json()} == {ACME}
    r = httpx.get(f"{url}/admin/dlq/sample", headers=bearer("acme-ops"), timeout=10)
    assert r.status_code == 403 and r.json()["error"] == "tenant_scope"  # all tenants at once
    r = httpx.post(f"{url}/admin/drain", headers=bearer("acme-ops"), timeout=10)
    assert r.status_code == 403 and r.json()["error"] == "tenant_scope"  # drains every tenant


# ------------------------------------------------------------------------------ fuzz
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120)
sig_items = st.lists(
    st.one_of(
        st.builds(lambda n: f"t={n}", st.integers(-5, 2 * 10**12)),
        st.builds(lambda h: f"v1={h}", st.text("0123456789abcdef", min_size=62, max_size=66)),
        st.builds(lambda k: f"kid={k}", st.sampled_from([ACME, GLOBEX, "x y"])),
        header_text,
    ),
    max_size=6,
).map(",".join)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    which=st.integers(0, 11),
    signature=st.none() | sig_items,
    authorization=st.none() | header_text | st.builds(lambda t: f"Bearer {t}", header_text),
)
def test_fuzzed_auth_headers_are_refused_and_change_nothing(
    env: Env, which: int, signature: str | None, authorization: str | None
) -> None:
    method, path = endpoints(env)[which]
    headers = {"Content-Type": "application/json"}
    # HTTP clients do not send values with surrounding whitespace (h11 refuses them)
    if signature is not None and signature.strip():
        headers[signing.HEADER] = signature.strip()
    if authorization is not None and authorization.strip():
        headers["Authorization"] = authorization.strip()
    before = env.snapshot()
    r = httpx.request(
        method,
        f"{env.svc.url}{path}",
        content=json.dumps(record(ACME, "f")),
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 401, (path, headers, r.text)
    assert r.json()["error"] and r.json()["reason"]
    assert env.snapshot() == before


# ------------------------------------------------------------------------------ isolation
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    owner=st.sampled_from([ACME, GLOBEX]),
    target=st.sampled_from([ACME, GLOBEX]),
    kind=st.sampled_from(["signature", "signature+kid", "api key", "token", "cli post"]),
    endpoint=st.sampled_from(
        ["webhook", "summary", "sample", "redrive", "replay", "approve", "audit"]
    ),
)
def test_no_tenant_credential_reaches_another_tenant(
    env: Env, owner: str, target: str, kind: str, endpoint: str
) -> None:
    """A credential of `owner` (signing secret, API key, token scoped to it, or `ingest post`
    with its secret) never reads or writes `target`'s data when target != owner."""
    if kind == "api key" and owner not in API_KEY:
        owner = ACME
    body = json.dumps(record(target, f"iso-{time.monotonic_ns()}")).encode()
    before = env.snapshot()
    if kind == "cli post":
        out = subprocess.run(
            [
                str(BIN / "ingest"),
                "post",
                f"{target}/orders",
                body.decode(),
                "--url",
                env.svc.url,
                "--secret",
                SECRETS[owner][-1],
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env.svc.env,
        )
        if owner == target:
            assert out.returncode == 0, out.stdout + out.stderr
            env.wait_idle()
        else:
            assert out.returncode == 1 and "401" in out.stderr, out.stdout + out.stderr
            assert env.snapshot() == before
        return
    headers: dict[str, str]
    if kind == "token":
        headers = bearer("acme-ops" if owner == ACME else "globex-ops")
    elif kind == "api key":
        headers = {"Authorization": f"Bearer {API_KEY[owner]}", "Content-Type": "application/json"}
    else:
        headers = signed(owner, body, kid=owner if kind == "signature+kid" else None)
    method, path = {
        "webhook": ("POST", f"/v1/webhooks/{target}/orders"),
        "summary": ("GET", f"/admin/dlq/summary?tenant={target}"),
        "sample": ("GET", f"/admin/dlq/sample?tenant={target}&full=1"),
        "redrive": ("POST", f"/admin/dlq/redrive?tenant={target}&id=999999"),
        "replay": ("GET", f"/admin/replay?tenant={target}"),
        "approve": ("POST", f"/admin/replay/{env.plan}/approve?rfa=RFA-9"),  # acme's plan
        "audit": ("GET", f"/admin/audit?tenant={target}"),
    }[endpoint]
    if endpoint == "approve":
        target = ACME
    r = httpx.request(method, f"{env.svc.url}{path}", content=body, headers=headers, timeout=30)
    tenant_cred = kind != "token"
    if owner != target or (tenant_cred != (endpoint == "webhook")):
        assert r.status_code in (401, 403), (owner, target, kind, endpoint, r.text)
        after = env.snapshot()
        if r.status_code == 403 and kind == "token":
            assert after.pop("audit") == before.pop("audit") + 1
        assert after == before
        if r.status_code == 200:  # never: but if it were, no other tenant's rows may show
            raise AssertionError(r.text)
    else:
        assert r.status_code < 400 or r.json()["error"] not in (
            "missing_credential",
            "bad_credential",
            "wrong_tenant",
            "tenant_scope",
            "bad_signature",
        ), (owner, kind, endpoint, r.text)
        if endpoint in ("sample", "replay", "audit") and r.status_code == 200:
            rows = r.json()
            assert all(x.get("tenant") in (owner, None) for x in rows), rows
        if endpoint == "webhook":
            env.wait_idle()


# ------------------------------------------------------------------------------ rotation
def ingest_cli(e: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "ingest"), *args], env=e.svc.env, cwd=e.svc.data_dir,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def post_as(e: Env, tenant: str, secret: str) -> httpx.Response:
    body = json.dumps(record(tenant, f"rot-{time.monotonic_ns()}")).encode()
    return httpx.post(f"{e.svc.url}/v1/webhooks/{tenant}/orders", content=body,
                      headers=signed(tenant, body, secret=secret), timeout=30)  # fmt: skip


def eventually(cond: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_key_rotation_with_two_secrets_without_restart(env: Env) -> None:
    """initech: one secret -> add a second (both accepted) -> retire the first (refused)."""
    old = SECRETS[INITECH][0]
    assert post_as(env, INITECH, old).status_code == 202
    out = ingest_cli(env, "auth", "add-secret", "--tenant", INITECH, "--file", str(env.creds))
    assert out.returncode == 0, out.stderr
    new = out.stdout.strip()
    assert new.startswith("whsec_") and new not in out.stderr
    eventually(lambda: post_as(env, INITECH, new).status_code == 202, "the new secret")
    assert post_as(env, INITECH, old).status_code == 202  # both while senders switch
    out = ingest_cli(env, "auth", "retire-secret", "--tenant", INITECH, "--file", str(env.creds))
    assert out.returncode == 0, out.stderr
    eventually(lambda: post_as(env, INITECH, old).status_code == 401, "the old secret refused")
    r = post_as(env, INITECH, old)
    assert r.json()["error"] == "bad_signature"
    assert post_as(env, INITECH, new).status_code == 202
    out = ingest_cli(env, "auth", "retire-secret", "--tenant", INITECH, "--file", str(env.creds))
    assert out.returncode == 2 and "would leave it none" in " ".join(out.stderr.split())
    assert stat_mode(env.creds) == 0o600
    env.wait_idle()


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# ------------------------------------------------------------------------------ audit trail
def test_every_admin_call_is_in_the_audit_trail(env: Env) -> None:
    url, admin = env.svc.url, bearer("ops-admin")
    calls = [
        ("POST", "/admin/drain", 200, "admin.drain", "ok"),
        ("POST", "/admin/resume", 200, "admin.resume", "ok"),
        ("POST", "/admin/brownout?rate=0.2", 200, "admin.brownout", "ok"),
        ("POST", "/admin/brownout?rate=7", 400, "admin.brownout", "refused"),
        ("POST", "/admin/pause", 200, "admin.pause", "ok"),
        ("POST", "/admin/resume", 200, "admin.resume", "ok"),
        ("GET", f"/admin/dlq/sample?tenant={GLOBEX}", 200, "dlq.sample", "ok"),
        ("POST", f"/admin/dlq/redrive?tenant={GLOBEX}&id=999999", 200, "dlq.redrive", "ok"),
    ]
    start = time.time()
    for method, path, status, _, _ in calls:
        r = httpx.request(method, f"{url}{path}", headers=admin, timeout=60)
        assert r.status_code == status, (path, r.text)
    # a forwarded address is not the peer: the audit row names the TCP peer, never a header's
    spoof = {**bearer("viewer"), "X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9"}
    r = httpx.post(f"{url}/admin/drain", headers=spoof, timeout=10)
    assert r.status_code == 403
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start - 1))
    out = ingest_cli(env, "audit", "--json", "--since", since)
    assert out.returncode == 0, out.stderr
    rows = [r for r in reversed(json.loads(out.stdout)) if r["via"] == "token"]
    got = [(r["action"], r["actor"], r["outcome"]) for r in rows]
    assert got == [(a, "ops-admin", o) for *_, a, o in calls] + [
        ("admin.drain", "viewer", "denied")
    ]
    for row in rows:
        assert row["remote"].startswith("127.0.0.1:") and row["at"] >= start - 1
    assert (
        rows[2]["detail"]["params"] == {"rate": "0.2"}
        and rows[3]["detail"]["error"] == "invalid_rate"
    )
    assert rows[6]["tenant"] == GLOBEX
    table = ingest_cli(env, "audit", "--action", "admin.", "--limit", "3")
    assert table.returncode == 0 and "ops-admin" in table.stdout and "denied" in table.stdout, (
        table.stdout
    )
    via_api = httpx.get(f"{url}/admin/audit?action=admin.&limit=2", headers=bearer("viewer"))
    assert [r["action"] for r in via_api.json()] == ["admin.drain", "admin.resume"]


def test_replay_approval_through_the_service_needs_an_approver_other_than_the_author(
    env: Env, tmp_path: Path
) -> None:
    out = replayctl(env.svc, "plan", "--tenant", ACME, "--from", "2025-01-01T00:00:00Z",
                    "--to", "2025-01-02T00:00:00Z", "--sources", "inbox-dropped",
                    "--as", "acme-ops", "--json")  # fmt: skip
    mine = json.loads(out.stdout)["id"]
    cli = {**env.svc.env, "INGEST_URL": env.svc.url, "INGEST_TOKEN": TOKENS["acme-ops"]}
    r = subprocess.run([str(BIN / "replayctl"), "approve", mine, "--json"], env=cli,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "four eyes" in r.stderr, r.stderr  # the token wrote it
    cli["INGEST_TOKEN"] = TOKENS["globex-ops"]
    r = subprocess.run([str(BIN / "replayctl"), "approve", mine], env=cli,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "tenant_scope" in r.stderr, r.stderr
    cli["INGEST_TOKEN"] = TOKENS["ops-admin"]
    r = subprocess.run([str(BIN / "replayctl"), "approve", mine, "--json"], env=cli,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["approved_by"] == "ops-admin"
    trail = json.loads(ingest_cli(env, "audit", "--json", "--action", "replay.approve").stdout)
    assert [(t["actor"], t["outcome"], t["target"]) for t in trail[:3]] == [
        ("ops-admin", "ok", mine),
        ("globex-ops", "denied", mine),
        ("acme-ops", "refused", mine),
    ]
