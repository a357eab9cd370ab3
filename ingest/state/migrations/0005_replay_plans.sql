-- Replay plans (ingest.replay.plans), one jsonb document each.
-- IF NOT EXISTS: databases where PostgresPlanStore.ensure_schema() created it keep it.
CREATE TABLE IF NOT EXISTS replay_plans (
    id         text PRIMARY KEY,
    tenant     text NOT NULL,
    state      text NOT NULL,
    created_at double precision NOT NULL,
    doc        jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS replay_plans_tenant ON replay_plans (tenant, created_at);
