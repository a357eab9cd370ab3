"""Sink adapters: one module per backend, each implementing `ingest.sinks.base.Sink`."""
