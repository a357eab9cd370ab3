"""Console scripts: `ingest` (the service), `dlqtriage`, `replayctl`."""
