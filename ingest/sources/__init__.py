"""Source adapters: one module per kind, each implementing `ingest.sources.base.Source`."""
