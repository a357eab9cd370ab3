-- The audit trail: every admin call and replay step, append-only (ingest/state/audit.py).
CREATE TABLE audit_log (
    id      bigserial        PRIMARY KEY,
    at      double precision NOT NULL,   -- epoch seconds; to_timestamp(at) to read
    actor   text             NOT NULL,
    via     text             NOT NULL,
    action  text             NOT NULL,
    outcome text             NOT NULL,
    remote  text             NOT NULL,
    tenant  text,
    target  text             NOT NULL,
    detail  jsonb            NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at_idx ON audit_log (at);
