"""`ingest auth ...` edits the credentials file; `ingest sign|post` sign a webhook body.

Every `auth` command reads the credentials file (`--file`, else the configured one, else the
embedded dev file `<data_dir>/credentials.yaml`), changes one thing, writes it back mode 0600
and prints a new secret exactly once on stdout. A running service picks the change up within
a second. Rotation step by step: docs/security.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr, ValidationError

from ingest.auth import credentials as C
from ingest.auth import signing
from ingest.cli.common import (
    CLI,
    EXIT_FAILED,
    EXIT_USAGE,
    err_console,
    fail,
    load,
)
from ingest.cli.remote import DEFAULT_URL, call
from ingest.errors import ConfigError
from ingest.timefmt import parse_when
from ingest.tools.console import console, styled

app = CLI(
    help="Credentials: operator tokens, tenant signing secrets and API keys "
    "(docs/security.md). Each command edits the credentials file in place (mode 0600) and "
    "prints a new secret once.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Service config file.")]
FileOpt = Annotated[
    Path | None,
    typer.Option(
        "--file",
        "-f",
        help="Credentials file (default: the configured one, else <data_dir>/credentials.yaml).",
    ),
]
TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="Tenant name.")]
SecretOpt = Annotated[
    str | None,
    typer.Option(
        "--secret",
        envvar="INGEST_WEBHOOK_SECRET",
        help="Tenant signing secret (default: from the credentials file).",
        show_envvar=True,
    ),
]


# ------------------------------------------------------------------------------ the file


def _path(option: Path | None, config: Path | None, *, must_exist: bool = False) -> Path:
    if option is not None:
        return option
    cfg = load(config)
    if cfg.auth.credentials_file is not None:
        return cfg.auth.credentials_file
    dev = cfg.data_dir / C.DEV_FILE
    if dev.exists() or not must_exist:
        return dev
    fail(
        "no credentials file: pass --file PATH, set INGEST_CREDENTIALS_FILE, or start the "
        "service once in embedded mode (it writes <data_dir>/credentials.yaml)",
        EXIT_USAGE,
    )


def _read(path: Path) -> C.Credentials:
    if not path.exists():
        return C.Credentials()
    try:
        return C.read_file(path)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def _save(path: Path, creds: C.Credentials, **changes: Any) -> None:
    try:
        updated = C.Credentials.model_validate({**_raw(creds), **changes})
    except ValidationError as exc:
        err = exc.errors()[0]
        fail(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}", EXIT_USAGE)
    C.write_private(path, C.dump(updated))
    err_console.print(f"updated {path} (a running service reloads it within a second)")


def _raw(creds: C.Credentials) -> dict[str, Any]:
    """The model as plain values, secrets included (for model_validate after a change)."""
    return {
        "tokens": list(creds.tokens),
        "tenants": dict(creds.tenants),
        "tenant_secret_keys": list(creds.tenant_secret_keys),
    }


def _tenant_name(tenant: str) -> str:
    if not signing.NAME.match(tenant):
        fail(f"'{tenant}' is not a tenant name ({signing.NAME.pattern})", EXIT_USAGE)
    return tenant


def _entry(creds: C.Credentials, tenant: str) -> C.TenantCredentials:
    """The tenant's entry; a tenant still on a derived secret keeps it as its older secret,
    so giving it an explicit one locks no sender out."""
    entry = creds.tenants.get(tenant)
    if entry is not None:
        return entry
    derived = creds.secrets_for(tenant)[-1:]
    return C.TenantCredentials(secrets=[SecretStr(s) for s in derived])


def _with_tenant(creds: C.Credentials, tenant: str, entry: C.TenantCredentials) -> dict[str, Any]:
    return {"tenants": {**creds.tenants, tenant: entry}}


# ------------------------------------------------------------------------------ tokens


@app.command("new-token")
def new_token(
    name: Annotated[str, typer.Option("--name", help="Who holds it (the audit trail's actor).")],
    roles: Annotated[
        str, typer.Option("--roles", help="Comma-separated: viewer,operator,approver.")
    ],
    tenants: Annotated[
        str, typer.Option("--tenants", help="Comma-separated tenants it may act on, or *.")
    ] = "*",
    expires: Annotated[
        str | None, typer.Option("--expires", help="ISO date-time or a lifetime like 90d.")
    ] = None,
    file: FileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Create an operator token; prints it once (only its SHA-256 is stored)."""
    path = _path(file, config)
    creds = _read(path)
    if any(t.name == name for t in creds.tokens):
        fail(f"a token named '{name}' exists; revoke it first or pick another name", EXIT_USAGE)
    role_list = [r.strip() for r in roles.split(",") if r.strip()]
    known = {r.value for r in C.Role}
    if not role_list or set(role_list) - known:
        fail(f"--roles takes a comma-separated list of {', '.join(sorted(known))}", EXIT_USAGE)
    until = None
    if expires is not None:
        try:
            until = parse_when(expires, future=True)
        except ValueError as exc:
            fail(f"--expires {exc}", EXIT_USAGE)
    token = C.new_token()
    entry = {
        "expires": until,
        "name": name,
        "roles": role_list,
        "tenants": [t.strip() for t in tenants.split(",") if t.strip()],
        "sha256": C.sha256_hex(token),
    }
    _save(path, creds, tokens=[*creds.tokens, entry])
    print(token)


@app.command("revoke-token")
def revoke_token(
    name: Annotated[str, typer.Option("--name", help="The token's name.")],
    file: FileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Remove an operator token; requests with it get 401 within a second."""
    path = _path(file, config, must_exist=True)
    creds = _read(path)
    kept = [t for t in creds.tokens if t.name != name]
    if len(kept) == len(creds.tokens):
        fail(f"no token named '{name}'", EXIT_USAGE)
    _save(path, creds, tokens=kept)


# ------------------------------------------------------------------------------ tenant secrets


@app.command("add-secret")
def add_secret(tenant: TenantOpt, file: FileOpt = None, config: ConfigOpt = None) -> None:
    """Add a new signing secret for a tenant (two at most: rotation); prints it."""
    path = _path(file, config)
    creds = _read(path)
    entry = _entry(creds, _tenant_name(tenant))
    if len(entry.secrets) >= 2:
        fail(
            f"tenant '{tenant}' already has two active secrets; "
            f"`ingest auth retire-secret --tenant {tenant}` drops the older one first",
            EXIT_USAGE,
        )
    secret = C.new_secret()
    entry = entry.model_copy(update={"secrets": [*entry.secrets, SecretStr(secret)]})
    _save(path, creds, **_with_tenant(creds, tenant, entry))
    print(secret)


@app.command("retire-secret")
def retire_secret(tenant: TenantOpt, file: FileOpt = None, config: ConfigOpt = None) -> None:
    """Drop a tenant's older signing secret (it must have two)."""
    path = _path(file, config, must_exist=True)
    creds = _read(path)
    entry = creds.tenants.get(_tenant_name(tenant))
    if entry is None or len(entry.secrets) < 2:
        fail(
            f"tenant '{tenant}' has fewer than two secrets; retiring would leave it none "
            "(add-secret first)",
            EXIT_USAGE,
        )
    entry = entry.model_copy(update={"secrets": entry.secrets[1:]})
    _save(path, creds, **_with_tenant(creds, tenant, entry))


@app.command("tenant-secret")
def tenant_secret(tenant: TenantOpt, file: FileOpt = None, config: ConfigOpt = None) -> None:
    """Print the newest signing secret of a tenant (its own, or derived), for its sender."""
    creds = _read(_path(file, config, must_exist=True))
    secrets = creds.secrets_for(_tenant_name(tenant))
    if not secrets:
        fail(f"tenant '{tenant}' has no signing secret: `ingest auth add-secret`", EXIT_USAGE)
    print(secrets[-1])


# ------------------------------------------------------------------------------ API keys


@app.command("new-api-key")
def new_api_key(tenant: TenantOpt, file: FileOpt = None, config: ConfigOpt = None) -> None:
    """Create an API key for a sender that cannot sign; prints it once (stored hashed)."""
    path = _path(file, config)
    creds = _read(path)
    entry = _entry(creds, _tenant_name(tenant))
    key = C.new_api_key()
    entry = entry.model_copy(
        update={"api_keys_sha256": [*entry.api_keys_sha256, C.sha256_hex(key)]}
    )
    _save(path, creds, **_with_tenant(creds, tenant, entry))
    print(key)


@app.command("revoke-api-key")
def revoke_api_key(
    tenant: TenantOpt,
    all_keys: Annotated[
        bool, typer.Option("--all", help="Every key, not only the oldest.")
    ] = False,
    file: FileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Revoke a tenant's oldest API key (or --all)."""
    path = _path(file, config, must_exist=True)
    creds = _read(path)
    entry = creds.tenants.get(_tenant_name(tenant))
    if entry is None or not entry.api_keys_sha256:
        fail(f"tenant '{tenant}' has no API key", EXIT_USAGE)
    kept = [] if all_keys else entry.api_keys_sha256[1:]
    entry = entry.model_copy(update={"api_keys_sha256": kept})
    _save(path, creds, **_with_tenant(creds, tenant, entry))


# ------------------------------------------------------------------------------ derivation keys


@app.command("add-secret-key")
def add_secret_key(file: FileOpt = None, config: ConfigOpt = None) -> None:
    """Add a tenant secret key (two at most); tenants without an entry get derived secrets."""
    path = _path(file, config)
    creds = _read(path)
    if len(creds.tenant_secret_keys) >= 2:
        fail("two tenant secret keys are active; retire-secret-key drops the older", EXIT_USAGE)
    key = C.new_secret(C.MASTER_PREFIX)
    _save(path, creds, tenant_secret_keys=[*creds.tenant_secret_keys, SecretStr(key)])
    err_console.print("the key itself stays here; hand out `ingest auth tenant-secret` values")


@app.command("retire-secret-key")
def retire_secret_key(file: FileOpt = None, config: ConfigOpt = None) -> None:
    """Drop the older tenant secret key (it must have two)."""
    path = _path(file, config, must_exist=True)
    creds = _read(path)
    if len(creds.tenant_secret_keys) < 2:
        fail("fewer than two tenant secret keys; retiring would leave none", EXIT_USAGE)
    _save(path, creds, tenant_secret_keys=creds.tenant_secret_keys[1:])


@app.command("list")
def list_cmd(
    file: FileOpt = None,
    config: ConfigOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Token names, roles and scopes; per tenant how many secrets and keys (no secrets)."""
    creds = _read(_path(file, config, must_exist=True))
    tokens = [
        {"name": t.name, "roles": [r.value for r in t.roles], "tenants": t.tenants}
        for t in creds.tokens
    ]
    tenants = {
        name: {"secrets": len(e.secrets), "api_keys": len(e.api_keys_sha256)}
        for name, e in creds.tenants.items()
    }
    doc = {
        "tokens": tokens,
        "tenants": tenants,
        "tenant_secret_keys": len(creds.tenant_secret_keys),
    }
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    from rich.table import Table

    table = Table("token", "roles", "tenants")
    for t in creds.tokens:
        table.add_row(t.name, ",".join(r.value for r in t.roles), ",".join(t.tenants))
    console().print(table)
    table = Table("tenant", "secrets", "api keys")
    for name, e in tenants.items():
        table.add_row(name, str(e["secrets"]), str(e["api_keys"]))
    console().print(table)
    print(f"tenant secret keys: {len(creds.tenant_secret_keys)}")


# ------------------------------------------------------------------------------ sign, post


def _body(body: str | None, file: Path | None) -> bytes:
    if body is not None and file is not None:
        fail("give the body as an argument or --file, not both", EXIT_USAGE)
    if body is not None:
        return body.encode()
    if file is not None and str(file) != "-":
        try:
            return file.read_bytes()
        except OSError as exc:
            fail(f"cannot read {file}: {exc.strerror}", EXIT_USAGE)
    if file is None and sys.stdin.isatty():
        fail("no body: give it as an argument, --file PATH, or on stdin", EXIT_USAGE)
    return sys.stdin.buffer.read()


def _secret(tenant: str, secret: str | None, config: Path | None) -> str:
    if secret:
        return secret
    cfg = load(config)
    path = cfg.auth.credentials_file or cfg.data_dir / C.DEV_FILE
    if path.exists():
        found = _read(path).secrets_for(tenant)
        if found:
            return found[-1]
    fail(
        f"no signing secret for tenant '{tenant}': pass --secret or set INGEST_WEBHOOK_SECRET "
        "(`ingest auth tenant-secret --tenant T` prints it where the credentials are)",
        EXIT_USAGE,
    )


BodyArg = Annotated[str | None, typer.Argument(help="The body (default: --file or stdin).")]
BodyFileOpt = Annotated[
    Path | None, typer.Option("--file", "-d", help="Read the body from a file ('-' = stdin).")
]


def sign(
    tenant: Annotated[str, typer.Argument(help="Tenant that signs.")],
    body: BodyArg = None,
    file: BodyFileOpt = None,
    secret: SecretOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print the X-Ingest-Signature header for a body: curl -H "$(ingest sign T "$body")"."""
    _tenant_name(tenant)
    raw = _body(body, file)
    print(f"{signing.HEADER}: {signing.header_value([_secret(tenant, secret, config)], raw)}")


def post(
    target: Annotated[str, typer.Argument(help="TENANT/SOURCE, e.g. acme-corp/orders.")],
    body: BodyArg = None,
    file: BodyFileOpt = None,
    url: Annotated[
        str, typer.Option("--url", envvar="INGEST_URL", help="The service.", show_envvar=True)
    ] = DEFAULT_URL,
    secret: SecretOpt = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="INGEST_API_KEY",
            help="Send this tenant API key instead of a signature.",
            show_envvar=True,
        ),
    ] = None,
    content_type: Annotated[str, typer.Option("--content-type")] = "application/json",
    config: ConfigOpt = None,
) -> None:
    """Sign a body and POST it to /v1/webhooks/TENANT/SOURCE; prints the answer."""
    tenant, slash, source = target.partition("/")
    if not slash:
        fail(f"'{target}' is not TENANT/SOURCE, e.g. acme-corp/orders", EXIT_USAGE)
    _tenant_name(tenant)
    raw = _body(body, file)
    headers = {"Content-Type": content_type}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    else:
        headers[signing.HEADER] = signing.header_value([_secret(tenant, secret, config)], raw)
    status, doc = call(
        "POST", url, f"/v1/webhooks/{tenant}/{source}", headers=headers, body=raw, operator=False
    )
    print(json.dumps(doc, indent=2))
    if status >= 300:
        styled(
            err_console,
            "[bold red]error:[/] the service answered {} {}",
            status,
            doc.get("error", ""),
        )
        raise typer.Exit(EXIT_FAILED)
