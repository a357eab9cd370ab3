"""botocore's model files for an S3 client parsed by orjson (`ingest.sources.s3`'s loader):
the same data, in the same key order, as botocore's own loader gives."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import botocore.loaders
import botocore.session

from ingest.sources.s3 import _LOADER, _OrjsonFileLoader


def s3_model_files() -> list[str]:
    """The files (paths without extension) botocore's own loader reads to build an S3 client
    and its listing paginator."""
    seen: list[str] = []
    loader = botocore.loaders.JSONFileLoader()
    original = loader.load_file

    def note(file_path: str) -> Any:
        data = original(file_path)
        if data is not None:
            seen.append(file_path)
        return data

    loader.load_file = note  # type: ignore[method-assign]
    session = botocore.session.Session()
    session.register_component("data_loader", botocore.loaders.Loader(file_loader=loader))
    client = session.create_client(
        "s3", region_name="us-east-1", aws_access_key_id="-", aws_secret_access_key="-"
    )
    client.get_paginator("list_objects_v2")
    client.close()
    return seen


def test_every_file_an_s3_client_reads_is_the_same_data_in_the_same_order() -> None:
    files = s3_model_files()
    assert any(f.endswith("s3/2006-03-01/service-2") for f in files)
    assert any(f.endswith("endpoints") for f in files)
    ours, botocores = _OrjsonFileLoader(), botocore.loaders.JSONFileLoader()
    for path in files:
        fast, slow = ours.load_file(path), botocores.load_file(path)
        assert type(fast) is dict, path  # orjson's: botocore's gives an OrderedDict
        assert json.dumps(fast) == json.dumps(slow), path  # values and key order


def test_the_shared_loader_parses_with_orjson() -> None:
    assert isinstance(_LOADER.file_loader, _OrjsonFileLoader)


def test_a_file_orjson_refuses_is_left_to_botocore(tmp_path: Path) -> None:
    (tmp_path / "odd.json").write_text('{"a": NaN, "b": [1, 2]}')  # json's extension, not JSON's
    data = _OrjsonFileLoader().load_file(str(tmp_path / "odd"))
    assert list(data) == ["a", "b"] and data["a"] != data["a"] and data["b"] == [1, 2]


def test_a_gzipped_file_is_read_and_a_missing_one_is_none(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "m.json.gz", "wb") as fp:
        fp.write(b'{"z": 1, "a": {"y": [true, null]}}')
    loader = _OrjsonFileLoader()
    data = loader.load_file(str(tmp_path / "m"))
    assert json.dumps(data) == '{"z": 1, "a": {"y": [true, null]}}'
    assert loader.load_file(str(tmp_path / "absent")) is None
