"""Who may do what: webhook signatures per tenant, operator tokens with roles.

    signing.py      the webhook signature header (HMAC-SHA256 over "<t>.<raw body>")
    credentials.py  the credentials file: hashed operator tokens, tenant secrets, dev defaults
    seen.py         signatures already accepted inside the tolerance window (exact replays)
    guard.py        one decision per request: an Identity, or a Refusal (status, error, reason)

Every secret comparison is constant-time (`hmac.compare_digest`); nothing here logs a secret.
The threat model, the defaults and key rotation are in docs/security.md.
"""
