-- Low-priority records dropped in brownout, kept so a replay can bring them back.
-- dropped_at is epoch seconds (double precision) so it round-trips exactly; use
-- to_timestamp(dropped_at) to read it.
CREATE TABLE dropped (
    key        bytea            PRIMARY KEY,
    tenant     text             NOT NULL,
    source     text             NOT NULL,
    payload    bytea            NOT NULL,
    dropped_at double precision NOT NULL
);
CREATE INDEX dropped_tenant_key_idx ON dropped (tenant, key);
