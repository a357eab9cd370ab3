# The service's image: Debian 12 + Debian's python3.11 + the locked dependencies + the decoder's
# compiled fast path (built in the build stage with Debian's Rust), run as a
# non-root user, `ingest run` under tini as PID 1 (SIGTERM drains, flushes, checkpoints, exits 0).
#   make image        build localhost/ingest:latest (scripts/image/build.sh)
#   make image-test   build it, then prove it (tests/image/): ready, a signed record lands,
#                     SIGTERM exits 0
# No image registry is reachable here, so the base is made from Debian's archive by
# scripts/image/debian-base.sh (localhost/debian:bookworm). HTTPS during the build (PyPI) may be
# re-signed by a local CA: build.sh passes the host's CA bundle as the build secret `ca_bundle`,
# used by the RUN steps that download and never stored in a layer.
ARG BASE_IMAGE=localhost/debian:bookworm

FROM ${BASE_IMAGE} AS build
ARG UV_VERSION=0.13.9
# cargo-web: Debian 12's current Rust (bookworm-security), which builds the decoder's compiled
# fast path (ingest_native/, maturin) and reads the crates.io index over HTTPS.
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      python3.11 python3.11-venv cargo-web \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=secret,id=ca_bundle \
    python3.11 -m venv /opt/uv \
 && PIP_CERT=/run/secrets/ca_bundle /opt/uv/bin/pip install -q --no-cache-dir "uv==${UV_VERSION}"
# Debian's interpreter (the runtime stage has the same one at the same path), no downloads;
# bytecode compiled now because the root filesystem is read-only at run time.
ENV UV_PYTHON=/usr/bin/python3.11 UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# Dependencies first: their layer is reused until uv.lock changes (the workspace's two
# packages, ingest and ingest-native, come after).
COPY pyproject.toml uv.lock ./
COPY ingest_native/pyproject.toml ./ingest_native/
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/uv \
    SSL_CERT_FILE=/run/secrets/ca_bundle /opt/uv/bin/uv sync --frozen --no-dev --no-install-workspace
COPY README.md ./
COPY ingest ./ingest
COPY ingest_native ./ingest_native
# The project and its compiled fast path as wheels (not editable): the runtime stage needs
# /app/.venv only. --reinstall-package: uv's cache keys a directory's built wheel on
# pyproject.toml alone (its mtime), so with the cache mount every build shipped the wheel first
# built: stale code. cargo fetches the crates of ingest_native/Cargo.lock (--locked) through
# the same CA bundle.
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/uv \
    --mount=type=cache,target=/root/.cargo/registry \
    SSL_CERT_FILE=/run/secrets/ca_bundle CARGO_HTTP_CAINFO=/run/secrets/ca_bundle \
    /opt/uv/bin/uv sync --frozen --no-dev --no-editable \
      --reinstall-package ingest --reinstall-package ingest-native

FROM ${BASE_IMAGE}
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      python3.11 ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/ingest --create-home \
      --shell /usr/sbin/nologin ingest
COPY --from=build /app/.venv /app/.venv
# Embedded mode keeps its SQLite files, inbox and dev credentials in the data dir: a volume
# (Kubernetes: an emptyDir or a PVC) when the root filesystem is read-only.
ENV PATH=/app/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 INGEST_DATA_DIR=/var/lib/ingest
WORKDIR /var/lib/ingest
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
# PID 1 is tini (no shell in between): it hands SIGTERM to `ingest run` (its drain handler) and
# exits with its code, and it reaps every orphan. A pod's workers are children of its fork
# server; one that dies is handed to PID 1, which the service as PID 1 never reaped (zombies).
# -s: a subreaper too, for when it is not PID 1 (`docker run --init`, a shared PID namespace).
# Kubernetes: set `args` only; a `command` would replace this entry point and drop tini.
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "ingest"]
CMD ["run", "--host", "0.0.0.0"]
