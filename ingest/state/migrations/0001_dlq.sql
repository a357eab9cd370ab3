-- The dead-letter queue: one row per (dedupe_key, sink); sink '' = failed before routing.
CREATE TABLE dlq (
    id              bigserial PRIMARY KEY,
    dedupe_key      bytea       NOT NULL,
    sink            text        NOT NULL DEFAULT '',
    tenant          text        NOT NULL,
    source          text        NOT NULL,
    reason          text        NOT NULL CHECK (reason IN (
                        'SCHEMA_DRIFT', 'VALIDATION_FAIL', 'OLDER_REVISION', 'SINK_TIMEOUT',
                        'CONSTRAINT_VIOLATION', 'CONNECTION_ERROR', 'RATE_LIMITED', 'CIRCUIT_OPEN')),
    detail          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    payload         bytea       NOT NULL,
    attempts        integer     NOT NULL CHECK (attempts >= 0),
    first_failed_at timestamptz NOT NULL,
    last_failed_at  timestamptz NOT NULL,
    entity_type     text,
    entity_id       text,
    revision        bigint,
    CONSTRAINT dlq_dedupe_key_sink_key UNIQUE (dedupe_key, sink)
);

-- Triage: `dlqtriage summary/sample --tenant --reason`, per-sink redrive, purge by age.
CREATE INDEX dlq_tenant_reason_last_idx ON dlq (tenant, reason, last_failed_at);
CREATE INDEX dlq_tenant_sink_idx ON dlq (tenant, sink);
CREATE INDEX dlq_first_failed_idx ON dlq (first_failed_at);

-- Records processed per (tenant, source): the denominator of the DLQ rate.
CREATE TABLE dlq_processed (
    tenant text   NOT NULL,
    source text   NOT NULL,
    total  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, source)
);
