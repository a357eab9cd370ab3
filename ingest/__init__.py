"""Multi-tenant ingest service (docs/architecture.md).

One start-up cut lives here because it must come before any import of httpx: httpx's package
imports its own command-line client (`httpx._main`: click, rich, pygments, ~0.35 s of CPU) when
those are installed, and they are (rich for our CLI). The service never runs httpx's CLI, yet
aiobotocore imports httpx for its optional backend, so every S3 process paid it. Marking
`httpx._main` as absent makes httpx define its fallback `main` instead; the `httpx` command,
a process of its own that does not import `ingest`, is unaffected.
"""

import sys

sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
