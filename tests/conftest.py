"""Shared test helpers. Servers come from `scripts/services/up.sh` (run by `make test`)."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# Property tests check answers, not speed: on 2 loaded cores one example can take far longer
# than hypothesis' default 200 ms deadline, and a deadline miss is then a failure about nothing.
settings.register_profile("ingest", deadline=None)
settings.load_profile("ingest")


def require_env(name: str, script: str) -> str:
    """A server coordinate from the environment, or a test error saying how to get it."""
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: start the server with `scripts/services/up.sh {script}` and "
            f"source the env file it names on its last line (make test does both)",
            pytrace=False,
        )
    return value


# tests/image/ runs the container image (root + podman): `make image-test` only.
collect_ignore = [] if os.environ.get("INGEST_IMAGE_TEST") == "1" else ["image"]
