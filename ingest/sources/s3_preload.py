"""Preloaded by a pod's fork server when an S3 source is configured (`ingest.pod.spawn`):
parses botocore's S3 models once, into the loader every worker's clients share
(`ingest.sources.s3.preload_models`), instead of once per worker after its fork."""

from ingest.sources.s3 import preload_models

preload_models()
