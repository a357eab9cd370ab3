"""The service's configuration: one YAML file validated into typed models.

No file at all means the embedded default: SQLite state and sink under `./data`, an inbox
directory and webhooks. Unknown keys are refused (`extra="forbid"`), and every error names
the key path and what was wrong, e.g. `config error at 'sinks[0].dsn': field required`.
Environment variables override the store URLs: INGEST_REDIS_URL, INGEST_POSTGRES_URL,
INGEST_HTTP_PORT, INGEST_ADMIN_PORT, INGEST_CREDENTIALS_FILE, INGEST_DATA_DIR, INGEST_WORKERS,
INGEST_LOG_FORMAT
(all but the first two in every mode).
"""

from __future__ import annotations

import os
import typing
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ingest.errors import ConfigError
from ingest.names import representable, shown

__all__ = ["Config", "ConfigError", "load_config", "parse_config"]


def _usable_path(path: Path) -> Path:
    if "\0" in str(path):
        raise ValueError("a path cannot contain a NUL character")
    return path


FilePath = Annotated[Path, AfterValidator(_usable_path)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantLimits(_Model):
    rate: float = Field(20_000.0, gt=0, description="Tokens (records) per second for the tenant.")
    burst: float = Field(
        40_000.0,
        gt=0,
        description="Bucket size: records admitted at once (a webhook body of more gets 413).",
    )


class IntakeBoundConfig(_Model):
    """Closed-loop admission of webhooks (ingest/pipeline/closed_loop.py): the intake backlog
    may hold what the pipeline drains in `lag_budget_seconds`, past it 429 + Retry-After."""

    lag_budget_seconds: float = Field(
        30.0, gt=0, description="Share of the 60 s lag SLO the intake backlog may hold."
    )
    max_backlog_records: int = Field(
        1_000_000,
        ge=1,
        description="Hard cap on records waiting in the intake; a webhook body of more gets 413.",
    )
    max_backlog_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Hard cap on bytes waiting in the intake."
    )
    min_backlog_records: int = Field(
        10_000, ge=1, description="Always allowed (before the drain rate is measured)."
    )
    rate_window_seconds: float = Field(
        5.0, gt=0, description="Smoothing time of the measured drain rate."
    )
    max_retry_after_seconds: float = Field(
        60.0, ge=1, description="Upper bound of the Retry-After answered with a 429."
    )


class AdmissionConfig(_Model):
    max_in_flight: int = Field(4, ge=1, description="Batches in sinks at once (semaphore).")
    queue_high_watermark: int = Field(50_000, ge=1, description="Queue depth that starts brownout.")
    queue_low_watermark: int = Field(10_000, ge=0, description="Queue depth that ends brownout.")
    brownout_after_seconds: float = Field(
        10.0, ge=0, description="How long depth must stay above the high watermark."
    )
    brownout_rate: float = Field(
        0.5, gt=0, le=1, description="Share of low-priority records kept in brownout."
    )
    default_limits: TenantLimits = TenantLimits()
    intake: IntakeBoundConfig = Field(
        IntakeBoundConfig(), description="Bound of the webhook intake backlog (429 beyond)."
    )

    @model_validator(mode="after")
    def _watermarks(self) -> AdmissionConfig:
        if self.queue_low_watermark >= self.queue_high_watermark:
            raise ValueError("queue_low_watermark must be below queue_high_watermark")
        return self


class RetryConfig(_Model):
    max_attempts: int = Field(
        6, ge=1, description="Attempts per record and sink, the first included."
    )
    base_delay_seconds: float = Field(0.2, gt=0)
    max_delay_seconds: float = Field(10.0, gt=0)
    max_total_seconds: float = Field(60.0, gt=0, description="Give up (DLQ) after this long.")


class BreakerConfig(_Model):
    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open it.")
    reset_timeout_seconds: float = Field(30.0, gt=0, description="Open -> half-open after this.")


class HttpConfig(_Model):
    host: str = Field(
        "127.0.0.1",
        description="Listen address: loopback by default; 0.0.0.0 to serve other hosts "
        "(a container, a pod).",
    )
    port: int = Field(8080, ge=0, le=65535, description="Listen port (INGEST_HTTP_PORT).")
    admin_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="When set, /admin/* is served only on this port (INGEST_ADMIN_PORT), "
        "not on `port`; probes, /metrics and /health/* answer on both.",
    )
    admin_host: str | None = Field(
        None, description="Listen address of admin_port (default: host)."
    )
    max_body_bytes: int = Field(5 * 1024 * 1024, ge=1, description="Larger webhook bodies get 413.")
    max_record_bytes: int = Field(
        1024 * 1024,
        ge=1,
        description="Larger records go to the DLQ; file lines longer than this are cut off "
        "unread (size and first bytes kept).",
    )
    body_timeout_seconds: float = Field(
        60.0, gt=0, description="A webhook body must be complete within this long, else 408."
    )
    min_body_bytes_per_second: float = Field(
        1024.0,
        ge=0,
        description="After body_grace_seconds, a webhook body slower than this on average gets "
        "408 and the connection is closed (0: no minimum).",
    )
    body_grace_seconds: float = Field(
        5.0, ge=0, description="Time a body may take before the minimum rate applies."
    )


class HealthConfig(_Model):
    stall_after_seconds: float = Field(
        120.0,
        gt=0,
        description="A source with pending work and no commit for this long is `stalled`.",
    )
    lag_slo_seconds: float = Field(
        60.0, gt=0, description="Adapter lag above this makes health `degraded` (the lag SLO)."
    )
    probe_seconds: float = Field(
        5.0, gt=0, description="How often sinks and state stores are actively probed."
    )
    live_timeout_seconds: float = Field(
        30.0, gt=0, description="/health/live fails when the event loop stalled this long."
    )


class DiskConfig(_Model):
    low_watermark_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="Free space under data_dir below which webhook intake is refused (507); "
        "what is left is the reserve for the pipeline's own writes (sinks, DLQ, checkpoints).",
    )
    high_watermark_bytes: int | None = Field(
        None, ge=0, description="Intake is accepted again above this (default: 2x low)."
    )

    @model_validator(mode="after")
    def _order(self) -> DiskConfig:
        if self.high_watermark_bytes is not None and (
            self.high_watermark_bytes < self.low_watermark_bytes
        ):
            raise ValueError("high_watermark_bytes must not be below low_watermark_bytes")
        return self


class SQLiteStateConfig(_Model):
    kind: Literal["sqlite"] = "sqlite"
    path: FilePath | None = Field(None, description="Defaults to <data_dir>/state.db.")
    idempotency_ttl_seconds: int = Field(7 * 86400, ge=1)


class ProductionStateConfig(_Model):
    kind: Literal["production"] = "production"
    redis_url: str = Field(description="Checkpoints and idempotency keys.")
    postgres_url: str = Field(description="DLQ (and replay plans).")
    idempotency_ttl_seconds: int = Field(7 * 86400, ge=1)
    worker_id: str | None = None


class AuthConfig(_Model):
    """`auth: disabled` (the whole section as one word) turns every check off."""

    mode: Literal["enabled", "disabled"] = Field(
        "enabled",
        description="disabled: no webhook or token checks (health and the log say so). "
        "Shorthand: `auth: disabled`.",
    )
    credentials_file: Path | None = Field(
        None,
        description="Tokens, tenant secrets and API keys (INGEST_CREDENTIALS_FILE; or the YAML "
        "inline in INGEST_CREDENTIALS). Embedded mode without one generates "
        "<data_dir>/credentials.yaml; production refuses to start without one.",
    )
    tolerance_seconds: int = Field(
        300, ge=1, le=3600, description="Webhook signatures older or newer than this are refused."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"mode": value} if value in ("enabled", "disabled") else value

    @property
    def disabled(self) -> bool:
        return self.mode == "disabled"


StateConfig = Annotated[SQLiteStateConfig | ProductionStateConfig, Field(discriminator="kind")]


class InboxSourceConfig(_Model):
    type: Literal["inbox"] = "inbox"
    name: str = "inbox"
    path: FilePath | None = Field(None, description="Defaults to <data_dir>/inbox.")
    poll_seconds: float = Field(
        0.1,
        gt=0,
        description="How often an idle worker looks for new files (a scan of the inbox's "
        "directories: ~0.3 % of a core for a pod of two workers at 0.1 s). On Linux a file "
        "renamed, created or closed after writing in a local inbox wakes an idle worker at "
        "once (inotify); the poll is the fallback (other OSes, network filesystems), where a "
        "file waits half of it on average before it is read.",
    )
    batch_size: int = Field(
        5000,
        ge=1,
        description="Lines per batch at most (batches never span files). Each batch costs a "
        "fixed round of work in the service, Postgres and Redis, as for Kafka and S3 "
        "(docs/benchmarks.md).",
    )


class WebhookSourceConfig(_Model):
    type: Literal["webhook"] = "webhook"
    name: str = "webhook"
    intake: Literal["sqlite", "kafka"] = Field(
        "sqlite", description="Where accepted bodies are made durable before the 202."
    )
    brokers: str | None = Field(None, description="Kafka brokers, for intake: kafka.")
    topic: str = "ingest-webhooks"
    group_id: str = "ingest-adapter-main"
    batch_size: int = Field(2000, ge=1)
    linger_seconds: float = Field(
        0.1,
        ge=0,
        description="SQLite intake: a batch short of batch_size waits until its oldest request "
        "is this old (never longer than this, whatever the clocks say), then takes what "
        "arrived meanwhile (a batch costs a fixed ~4 ms; 0 = take what is there).",
    )


class KafkaSourceConfig(_Model):
    type: Literal["kafka"] = "kafka"
    name: str = "kafka-main"
    brokers: str = "127.0.0.1:9092"
    topics: list[str]
    group_id: str = "ingest-adapter-main"
    tenant: str | None = Field(
        None, description="Tenant for every record when not in record/header."
    )
    tenant_header: str = "tenant"
    batch_size: int = Field(
        5000,
        ge=1,
        description="Messages per batch at most (one consume() call). Each batch costs a fixed "
        "round of work in the service, Postgres and Redis (docs/benchmarks.md, svc 2026-12-01); "
        "a consume() short of it returns within 0.5 s.",
    )
    extra: dict[str, str] = Field(default_factory=dict, description="librdkafka settings.")
    commit_stuck_seconds: float = Field(
        30.0,
        gt=0,
        description="Offsets durable in the sinks but not committed to Kafka for longer than "
        "this (the broker refusing commits: a rebalance that does not end, the coordinator "
        "unavailable) turn the adapter's status to `error` (health `degraded`) until a commit "
        "succeeds; a shorter refusal is normal in a rebalance.",
    )


_LEASE_TTL = (
    "A worker's claim on an object/file lapses this long after its last renewal (renewed every "
    "third of it), so another worker takes over a dead one's items after at most this long."
)


class S3SourceConfig(_Model):
    type: Literal["s3"] = "s3"
    name: str = "s3-main"
    url: str = Field(description="s3://bucket/prefix/")
    tenant: str
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    poll_seconds: float = Field(5.0, gt=0)
    batch_size: int = Field(
        5000,
        ge=1,
        description="Lines per batch at most; a batch runs across objects (the last batch of a "
        "listing pass is shorter). Each batch costs a fixed round of work in the service, "
        "Postgres and Redis (docs/benchmarks.md, svc 2026-12-01).",
    )
    lease_ttl_seconds: float = Field(60.0, gt=0, description=_LEASE_TTL)


class SFTPSourceConfig(_Model):
    type: Literal["sftp"] = "sftp"
    name: str = "sftp-main"
    tenant: str
    host: str
    port: int = 22
    user: str
    key_path: FilePath
    host_key: str = Field(description="Pinned host public key, OpenSSH format.")
    directory: str = "."
    processed_dir: str = "processed"
    in_progress_suffixes: list[str] = Field(default_factory=lambda: [".part", ".tmp", ".filepart"])
    poll_seconds: float = Field(5.0, gt=0)
    settle_seconds: float = Field(2.0, ge=0, description="Size/mtime must be stable this long.")
    batch_size: int = Field(2000, ge=1)
    lease_ttl_seconds: float = Field(60.0, gt=0, description=_LEASE_TTL)


SourceConfig = Annotated[
    InboxSourceConfig | WebhookSourceConfig | KafkaSourceConfig | S3SourceConfig | SFTPSourceConfig,
    Field(discriminator="type"),
]


class SQLiteSinkConfig(_Model):
    type: Literal["sqlite"] = "sqlite"
    name: str = "sqlite"
    path: FilePath | None = Field(None, description="Defaults to <data_dir>/sink.db.")


class PostgresSinkConfig(_Model):
    type: Literal["postgres"] = "postgres"
    name: str = "postgres"
    dsn: str | None = Field(None, description="Defaults to state.postgres_url.")
    table: str = "entities"
    statement_timeout_ms: int = Field(30_000, ge=1)
    fillfactor: int = Field(
        50,
        ge=10,
        le=100,
        description="Percent of each table page filled by inserts; the rest lets a revision "
        "update stay on its row's page (HOT: no new index entry, ~35% less server CPU per "
        "update). 100 for tables that are only inserted into (half the heap size).",
    )


class Neo4jSinkConfig(_Model):
    type: Literal["neo4j"] = "neo4j"
    name: str = "neo4j"
    uri: str = "bolt://127.0.0.1:7687"
    user: str = "neo4j"
    password: str = ""
    database: str | None = None


class TypesenseField(_Model):
    name: str
    type: str = "string"
    optional: bool = True
    facet: bool = False


class TypesenseSinkConfig(_Model):
    type: Literal["typesense"] = "typesense"
    name: str = "typesense"
    url: str = "http://127.0.0.1:8108"
    api_key: str
    fields: dict[str, list[TypesenseField]] = Field(
        default_factory=dict, description="Searchable attribute fields per entity type."
    )
    timeout_seconds: float = 10.0


SinkConfig = Annotated[
    SQLiteSinkConfig | PostgresSinkConfig | Neo4jSinkConfig | TypesenseSinkConfig,
    Field(discriminator="type"),
]


class Route(_Model):
    tenant: str = Field("*", description="Tenant id or '*'.")
    entity_type: str = Field("*", description="Entity type or '*'.")
    sinks: list[str]


def _default_sources() -> list[SourceConfig]:
    return [InboxSourceConfig(), WebhookSourceConfig()]


class FleetConfig(_Model):
    control_poll_seconds: float = Field(
        1.0,
        gt=0,
        le=10,
        description="How often every process re-reads the fleet's control record (what "
        "/admin/* set), the fallback to change notifications (Postgres LISTEN/NOTIFY).",
    )
    rate_limits: Literal["auto", "fleet", "local"] = Field(
        "auto",
        description="Per-tenant limits: fleet = GCRA in Redis, one limit shared by every pod "
        "(one script call per batch); local = a token bucket per process (N pods admit N x "
        "the limit); auto = fleet in production mode, local in embedded mode.",
    )


class ShutdownConfig(_Model):
    drain_timeout_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="On SIGTERM, how long in-flight batches may take to reach their sinks and "
        "commit before they are cancelled (they are then read again on the next start, nothing "
        "is acknowledged early). A pod's control plane waits this plus 10 s for its "
        "workers: Kubernetes' terminationGracePeriodSeconds must exceed preStop + this + 10 s "
        "(deploy/k8s, docs/deploy.md).",
    )


class ReplayConfig(_Model):
    rto_seconds: float = Field(
        4 * 3600.0,
        gt=0,
        description="Recovery time objective of a replay, first start to finish. Kept in each "
        "plan at `replayctl plan` (--rto overrides); IngestReplayRTOAtRisk fires when a "
        "replay is projected to miss it.",
    )


class LoggingConfig(_Model):
    format: Literal["text", "json"] = Field(
        "text",
        description="`text`: one readable line per event. `json`: one JSON object per line "
        "with ts, level, logger, message and, where known, tenant, source, batch and record "
        "(INGEST_LOG_FORMAT; docs/operations.md).",
    )


def _default_sinks() -> list[SinkConfig]:
    return [SQLiteSinkConfig()]


class Config(_Model):
    http: HttpConfig = Field(HttpConfig(), description="HTTP listener and body limits.")
    data_dir: FilePath = Field(
        Path("data"), description="Embedded files live here (INGEST_DATA_DIR)."
    )
    state: StateConfig = Field(
        SQLiteStateConfig(), description="Checkpoints, idempotency keys, DLQ: sqlite or production."
    )
    auth: AuthConfig = Field(
        AuthConfig(), description="Webhook signatures, operator tokens (docs/security.md)."
    )
    tenants: dict[str, TenantLimits] = Field(
        default_factory=dict, description="Per-tenant token bucket; others get the defaults."
    )
    admission: AdmissionConfig = Field(AdmissionConfig(), description="Backpressure settings.")
    fleet: FleetConfig = Field(
        FleetConfig(), description="Fleet-wide control state and rate limits."
    )
    replay: ReplayConfig = Field(ReplayConfig(), description="Replay objectives.")
    shutdown: ShutdownConfig = Field(ShutdownConfig(), description="Drain on SIGTERM.")
    workers: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Pipeline processes in this pod (INGEST_WORKERS); default: the cores this "
        "process may use. 1 = one process, as before; more = one control plane (HTTP, health, "
        "metrics) and N workers dividing the sources (docs/architecture.md, Scale-out).",
    )
    retry: RetryConfig = Field(RetryConfig(), description="Retry of retryable sink failures.")
    breaker: BreakerConfig = Field(BreakerConfig(), description="Circuit breaker per sink.")
    health: HealthConfig = Field(HealthConfig(), description="Stall detection and probes.")
    disk: DiskConfig = Field(DiskConfig(), description="Free-space watermarks on data_dir.")
    logging: LoggingConfig = Field(
        LoggingConfig(), description="Log format (the level is `ingest run --log-level`)."
    )
    sources: list[SourceConfig] = Field(default_factory=lambda: _default_sources())
    sinks: list[SinkConfig] = Field(default_factory=lambda: _default_sinks())
    routes: list[Route] = Field(
        default_factory=list, description="First match wins; none = all sinks."
    )
    transformers: list[str] = Field(
        default_factory=list,
        description='Repair functions "module:function" (dict -> dict), applied in order after '
        "the version upgrade and before validation (see ingest/transformers/extra.py).",
    )

    @model_validator(mode="after")
    def _names(self) -> Config:
        sink_names = [s.name for s in self.sinks]
        if len(set(sink_names)) != len(sink_names):
            raise ValueError(f"sink names must be unique, got {sink_names}")
        src_names = [s.name for s in self.sources]
        if len(set(src_names)) != len(src_names):
            raise ValueError(f"source names must be unique, got {src_names}")
        for i, route in enumerate(self.routes):
            for s in route.sinks:
                if s not in sink_names:
                    raise ValueError(f"routes[{i}] names unknown sink '{s}' (known: {sink_names})")
        if self.fleet.rate_limits == "fleet" and self.state.kind != "production":
            raise ValueError(
                "fleet.rate_limits: fleet needs state kind production (the limits live in Redis)"
            )
        return self

    def under_data_dir(self, path: Path | None, default_name: str) -> Path:
        """A configured path, or the default file name under data_dir."""
        return path if path is not None else self.data_dir / default_name

    def worker_count(self) -> int:
        """`workers`, or the cores this process may run on."""
        if self.workers is not None:
            return self.workers
        return max(1, len(os.sched_getaffinity(0)))

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.admission.default_limits)

    def sinks_for(self, tenant: str, entity_type: str) -> list[str]:
        """The sinks of the first route matching the pair (none matching: every sink).

        Remembered per (tenant, entity_type) pair, at most _ROUTES_KEPT of them: the config
        is frozen (a copy starts without the memo: `__copy__`). The list returned is shared:
        do not change it.
        """
        memo = self.route_memo
        found = memo.get((tenant, entity_type))
        if found is None:
            found = self._match(tenant, entity_type)
            if len(memo) >= _ROUTES_KEPT:
                memo.clear()
            memo[(tenant, entity_type)] = found
        return found

    def _match(self, tenant: str, entity_type: str) -> list[str]:
        for route in self.routes:
            if route.tenant in ("*", tenant) and route.entity_type in ("*", entity_type):
                return route.sinks
        return [s.name for s in self.sinks]

    @cached_property
    def route_memo(self) -> dict[tuple[str, str], list[str]]:
        """`sinks_for`'s answers so far (not a field: in no dump, no comparison)."""
        return {}

    def __copy__(self) -> Self:
        """`model_copy(update=...)` may change the routes or sinks: the copy's memo is new."""
        copied = super().__copy__()
        copied.__dict__.pop("route_memo", None)
        return copied

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Self:
        copied = super().__deepcopy__(memo)
        copied.__dict__.pop("route_memo", None)
        return copied


_ROUTES_KEPT = 4096  # (tenant, entity_type) pairs whose sinks `Config.sinks_for` remembers


_ENV_OVERRIDES = {
    "INGEST_REDIS_URL": ("state", "redis_url"),
    "INGEST_POSTGRES_URL": ("state", "postgres_url"),
    "INGEST_HTTP_PORT": ("http", "port"),
    "INGEST_ADMIN_PORT": ("http", "admin_port"),
    "INGEST_CREDENTIALS_FILE": ("auth", "credentials_file"),
    "INGEST_LOG_FORMAT": ("logging", "format"),
}


def _apply_env(raw: dict[str, Any]) -> dict[str, Any]:
    for var, (section, key) in _ENV_OVERRIDES.items():
        value = os.environ.get(var)
        if not value:
            continue
        sect = raw.setdefault(section, {})
        if not isinstance(sect, dict):
            continue
        if section == "state" and sect.get("kind", "sqlite") != "production":
            continue  # store URLs only mean something in production mode
        sect[key] = value
    if os.environ.get("INGEST_DATA_DIR"):
        data_dir = os.environ["INGEST_DATA_DIR"]
        if not representable(data_dir):
            raise ConfigError("INGEST_DATA_DIR", f"'{shown(data_dir)}' is not UTF-8")
        raw["data_dir"] = data_dir
    if os.environ.get("INGEST_WORKERS"):
        raw["workers"] = os.environ["INGEST_WORKERS"]
    return raw


def _tags(union: Any) -> set[str]:
    """The discriminator values (`type` / `kind`) of a discriminated union of models."""
    members = typing.get_args(typing.get_args(union)[0])
    out: set[str] = set()
    for model in members:
        for name in ("type", "kind"):
            f = model.model_fields.get(name)
            if f is not None:
                out.update(typing.get_args(f.annotation))
    return out


# Pydantic inserts the tag of the union member into an error's location; it is not a key the
# operator wrote. Derived from the unions, so a new source or sink needs no edit here.
_TAGS = frozenset(_tags(StateConfig) | _tags(SourceConfig) | _tags(SinkConfig))


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS and out:
            continue  # discriminator tag pydantic inserts; not a key the operator wrote
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def parse_config(raw: Any) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("<root>", f"expected a mapping, got {type(raw).__name__}")
    try:
        return Config.model_validate(_apply_env(raw))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(_key_path(tuple(err["loc"])), err["msg"]) from None


def load_config(path: Path | None) -> Config:
    """Load and validate; `None` gives the embedded default (environment overrides apply)."""
    if path is None:
        return parse_config({})
    where = shown(str(path))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(where, f"cannot read config file: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            where, f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(where, f"not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(where, "not valid YAML: nested too deeply") from None
    return parse_config(raw)
