"""The webhook signature: what a sender puts in `X-Ingest-Signature`, and how it is checked.

The scheme is Stripe's, so webhook libraries that sign that way need only the header name:

    X-Ingest-Signature: t=1735689600,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>[,kid=<tenant>]

`t` is the sender's Unix time; the receiver refuses it outside a tolerance window (replays of an
old request). Several `v1=` entries may be sent (one per secret while a sender rotates). `kid`
names the tenant whose secret signed; it is optional (default: the tenant in the URL) and only
lets the receiver tell "a valid credential of another tenant" (403) from "no valid credential"
(401). Unknown `key=value` items are ignored, as Stripe's `v0` is.

Shell, with openssl only:
    sig=$(printf '%s.%s' "$ts" "$body" | openssl dgst -sha256 -hmac "$secret" | cut -d' ' -f2)
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ingest.names import NAME_RULE

HEADER = "X-Ingest-Signature"
MAX_HEADER_CHARS = 1024
MAX_SIGNATURES = 4  # v1 entries looked at; more is refused as malformed (bounded work)
NAME = NAME_RULE  # tenant and source names: one rule (ingest.names)
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_ITEM_KEY = re.compile(r"^[A-Za-z0-9_-]{1,16}$")


class MalformedSignature(ValueError):
    """The header is not `t=<digits>,v1=<64 hex>[,...]`; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class SignatureHeader:
    timestamp: int
    signatures: tuple[str, ...]  # lowercase hex
    key_id: str | None = None


def signed_payload(timestamp: int, body: bytes) -> bytes:
    return b"%d." % timestamp + body


def compute(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.digest(secret.encode(), signed_payload(timestamp, body), "sha256").hex()


def header_value(
    secrets: Sequence[str], body: bytes, *, timestamp: int | None = None, key_id: str | None = None
) -> str:
    """What a sender puts in the header: one v1 per secret (two while it rotates)."""
    ts = int(time.time()) if timestamp is None else timestamp
    items = [f"t={ts}", *(f"v1={compute(s, ts, body)}" for s in secrets)]
    if key_id is not None:
        items.append(f"kid={key_id}")
    return ",".join(items)


def parse(value: str) -> SignatureHeader:
    if len(value) > MAX_HEADER_CHARS:
        raise MalformedSignature(f"{HEADER} is longer than {MAX_HEADER_CHARS} characters")
    ts: int | None = None
    sigs: list[str] = []
    kid: str | None = None
    for raw in value.split(","):
        key, eq, val = raw.strip().partition("=")
        if not eq or not _ITEM_KEY.match(key):
            raise MalformedSignature(f"{HEADER} items must be key=value, got {raw.strip()[:40]!r}")
        if key == "t":
            if ts is not None:
                raise MalformedSignature(f"{HEADER} has more than one t=")
            if not (val.isascii() and val.isdigit() and len(val) <= 12):
                raise MalformedSignature("t= must be the Unix time in whole seconds")
            ts = int(val)
        elif key == "v1":
            if not _HEX64.match(val):
                raise MalformedSignature("v1= must be 64 hex characters (HMAC-SHA256)")
            sigs.append(val.lower())
        elif key == "kid":
            if kid is not None or not NAME.match(val):
                raise MalformedSignature("kid= must appear once and name a tenant")
            kid = val
    if ts is None:
        raise MalformedSignature(f"{HEADER} has no t= (the signing time)")
    if not sigs:
        raise MalformedSignature(f"{HEADER} has no v1= signature")
    if len(sigs) > MAX_SIGNATURES:
        raise MalformedSignature(f"{HEADER} carries more than {MAX_SIGNATURES} v1= signatures")
    return SignatureHeader(ts, tuple(sigs), kid)


def matches(header: SignatureHeader, secrets: Sequence[str], body: bytes) -> bool:
    """True when one of the header's signatures is the HMAC of one of `secrets` (constant-time
    per comparison; every pair is compared, so the time does not say which one matched)."""
    found = False
    payload = signed_payload(header.timestamp, body)  # one copy of the body, not one per secret
    for secret in secrets:
        expected = hmac.digest(secret.encode(), payload, "sha256").hex()
        for sig in header.signatures:
            found |= hmac.compare_digest(expected, sig)
    return found
