"""scripts/services: two runs on one machine never collide, and generated arguments are never
read as options (a Kafka cluster id may start with '-')."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import require_env
from tests.integration.conftest import _env_file as env_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "services"
PORT_VARS = re.compile(r"^INGEST_TEST_\w*PORT$")


def clean_env(run_dir: Path) -> dict[str, str]:
    """The caller's environment without any port override, in a run dir of its own."""
    env = {k: v for k, v in os.environ.items() if not PORT_VARS.match(k)}
    return {**env, "INGEST_RUN_DIR": str(run_dir)}


def up_redis(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPTS / "up.sh"), "--no-install", "redis"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture
def run_dirs() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for d in made:
        subprocess.run([str(SCRIPTS / "down.sh"), "redis"], env=clean_env(d), timeout=60,
                       capture_output=True)  # fmt: skip
        shutil.rmtree(d, ignore_errors=True)


def test_two_runs_without_overrides_take_different_free_ports(run_dirs: list[Path]) -> None:
    require_env("INGEST_TEST_REDIS_URL", "redis")  # installed by the scripts
    envs = []
    for _ in range(2):
        d = Path(tempfile.mkdtemp(prefix="ingest-test-up-"))
        run_dirs.append(d)
        done = up_redis(clean_env(d))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"source '{d}/all.env'" in done.stdout  # the line to source, printed
        envs.append(env_file(d / "all.env") | env_file(d / "redis.env"))
    ports = [e["INGEST_TEST_REDIS_PORT"] for e in envs]
    assert ports[0] != ports[1]
    assert ports[0] not in ("16379", os.environ.get("INGEST_TEST_REDIS_PORT"))
    for e, d in zip(envs, run_dirs, strict=True):
        assert e["INGEST_RUN_DIR"] == str(d)
        assert e["INGEST_TEST_REDIS_URL"].endswith(f":{e['INGEST_TEST_REDIS_PORT']}/0")
        client = redis.Redis.from_url(e["INGEST_TEST_REDIS_URL"])
        client.set("who", str(d))
        assert client.get("who") == str(d).encode()  # each run talks to its own server


def test_an_override_port_is_kept(run_dirs: list[Path]) -> None:
    require_env("INGEST_TEST_REDIS_URL", "redis")
    d = Path(tempfile.mkdtemp(prefix="ingest-test-up-"))
    run_dirs.append(d)
    port = subprocess.run(["bash", "-c", f". {SCRIPTS}/lib.sh && free_ports 1"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    env = {**clean_env(d), "INGEST_TEST_REDIS_PORT": port}
    done = up_redis(env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert env_file(d / "redis.env")["INGEST_TEST_REDIS_PORT"] == port
    assert redis.Redis(port=int(port)).ping()


def test_a_second_up_in_the_same_run_dir_keeps_the_first_servers(run_dirs: list[Path]) -> None:
    require_env("INGEST_TEST_REDIS_URL", "redis")
    d = Path(tempfile.mkdtemp(prefix="ingest-test-up-"))
    run_dirs.append(d)
    assert up_redis(clean_env(d)).returncode == 0
    done = subprocess.run([str(SCRIPTS / "up.sh"), "--no-install", "tools"], env=clean_env(d),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    sourced = (d / "all.env").read_text()
    assert f"source '{d}/redis.env'" in sourced and f"source '{d}/tools.env'" in sourced
    out = subprocess.run(["bash", "-c", f"source '{d}/all.env' && echo $INGEST_TEST_REDIS_URL"],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert out == env_file(d / "redis.env")["INGEST_TEST_REDIS_URL"]


def test_free_ports_are_distinct_runs_of_free_ports() -> None:
    out = subprocess.run(["bash", "-c", f". {SCRIPTS}/lib.sh && free_ports 1 10 1 3 1"],
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    bases = [int(p) for p in out]
    spans = [range(b, b + n) for b, n in zip(bases, [1, 10, 1, 3, 1], strict=True)]
    taken = [p for span in spans for p in span]
    assert len(taken) == len(set(taken)) == 16


def test_kafka_storage_formats_with_a_cluster_id_starting_with_dash() -> None:
    """kafka-storage reads `--cluster-id -x...` as a missing argument (1.5 % of random ids
    start with '-'): the script must pass `--cluster-id=ID`."""
    require_env("INGEST_TEST_KAFKA_BROKERS", "kafka")  # installed by the scripts
    d = Path(tempfile.mkdtemp(prefix="ingest-test-kafka-format-"))
    try:
        cluster_id = "-" + "Q" * 20 + "A"  # 22 base64url chars = 16 bytes, as Kafka wants
        env = {**clean_env(d), "INGEST_TEST_KAFKA_CLUSTER_ID": cluster_id,
               "INGEST_TEST_KAFKA_PORT": "1", "INGEST_TEST_KAFKA_CONTROLLER_PORT": "2"}  # fmt: skip
        done = subprocess.run([str(SCRIPTS / "kafka.sh"), "format"], env=env,
                              capture_output=True, text=True, timeout=180)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        meta = (d / "kafka" / "data" / "meta.properties").read_text()
        assert f"cluster.id={cluster_id}\n" in meta
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_kafka_random_cluster_ids_never_start_with_dash() -> None:
    # ~1.5 % of base64url ids start with '-': 60 of 4000 would without the redraw.
    out = subprocess.run([str(SCRIPTS / "kafka.sh"), "cluster-id", "4000"], capture_output=True,
                         text=True, check=True, timeout=60)  # fmt: skip
    ids = out.stdout.split()
    assert len(ids) == 4000 and len(set(ids)) == 4000
    assert not [i for i in ids if i.startswith("-")]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) for i in ids)
