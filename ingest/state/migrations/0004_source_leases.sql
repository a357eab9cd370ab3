-- Item leases of S3/SFTP sources shared by workers on many hosts (ingest.state.leases).
-- IF NOT EXISTS: databases where PostgresLeaseStore.ensure_schema() created it keep it.
CREATE TABLE IF NOT EXISTS ingest_source_leases (
    source       text NOT NULL,
    item         text NOT NULL,
    version      text NOT NULL,
    owner        text NOT NULL,
    lease_until  timestamptz NOT NULL,
    "offset"     bigint NOT NULL DEFAULT 0,
    done_version text,
    PRIMARY KEY (source, item)
);
