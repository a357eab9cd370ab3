"""The S3 source's botocore loader answers as botocore's own for S3, without walking every
service directory of botocore's data (ingest.sources.s3._S3Loader)."""

from __future__ import annotations

import botocore.loaders  # type: ignore[import-untyped]
import pytest

from ingest.sources.s3 import _S3Loader

# What a client build and a listing load: the model, its paginators, its endpoint rules
KINDS = ["service-2", "paginators-1", "endpoint-rule-set-1", "waiters-2", "no-such-kind-1"]


@pytest.mark.parametrize("kind", KINDS)
def test_it_says_s3_exists_exactly_when_botocore_does(kind: str) -> None:
    theirs = botocore.loaders.Loader().list_available_services(kind)
    assert _S3Loader().list_available_services(kind) == (["s3"] if "s3" in theirs else [])


@pytest.mark.parametrize("kind", ["service-2", "paginators-1", "endpoint-rule-set-1"])
def test_it_loads_the_same_s3_models(kind: str) -> None:
    ours = _S3Loader().load_service_model("s3", kind)
    assert ours == botocore.loaders.Loader().load_service_model("s3", kind)


def test_another_service_is_unknown_to_it() -> None:
    with pytest.raises(botocore.exceptions.UnknownServiceError):
        _S3Loader().load_service_model("dynamodb", "service-2")
