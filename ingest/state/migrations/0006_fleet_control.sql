-- The fleet's control record (ingest.state.control): one row, id 1, seeded at start.
-- IF NOT EXISTS: databases where PostgresControlStore.ensure_schema() created it keep it.
CREATE TABLE IF NOT EXISTS fleet_control (
    id      smallint PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL,
    doc     jsonb NOT NULL
);
