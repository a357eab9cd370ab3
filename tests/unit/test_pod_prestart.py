"""`ingest run`'s fork server started before the CLI reads its config (ingest/pod/prestart.py).

The fork server reads the config itself and imports what a worker of it needs; a service that
is one process gets nothing preloaded and its fork server stopped. Each case runs in a process
of its own (a fork server is per process, and its module blocks SIGTERM where it is imported).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.pod.prestart import config_option

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """\
workers: {workers}
state: {{kind: production, redis_url: "redis://127.0.0.1:1/0",
        postgres_url: "postgresql://u:p@127.0.0.1:1/db"}}
sinks: [{{type: postgres, name: postgres}}]
sources: [{{type: s3, name: s3-main, url: "s3://bucket/prefix/", tenant: acme-corp,
           endpoint_url: "http://127.0.0.1:1"}}]
"""
# In the parent: start early as `ingest run --config <path>` would, then fork one child through
# the fork server and report what the child found imported (the fork server's preload).
PROBE = """\
import multiprocessing, sys
from multiprocessing import forkserver
from ingest.pod import prestart
started = prestart.start_early(["ingest", "run", "--config", sys.argv[1]])
ctx = multiprocessing.get_context("forkserver")
code = "import sys; sys.exit(10 * ('ingest.sources.s3' in sys.modules) + ('typer' in sys.modules))"
p = ctx.Process(target=exec, args=(code,))
p.start()
p.join()
if sys.argv[2] == "stop":
    pid = forkserver._forkserver._forkserver_pid
    prestart.stop_early()
    import os
    gone = not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    import psutil
    left = psutil.Process().children()
    print("stopped", gone, forkserver._forkserver._forkserver_pid, len(left))
print(started, p.exitcode)
"""


def probe(tmp_path: Path, workers: int, stop: str = "") -> list[str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(workers=workers))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(cfg), stop or "-"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return out.stdout.split()


def test_the_early_fork_server_preloads_what_the_config_names(tmp_path: Path) -> None:
    # the S3 client's modules, and not the CLI (typer): the fork server read the config
    assert probe(tmp_path, 2) == ["True", "10"]


def test_a_single_process_config_preloads_nothing_and_is_stopped(tmp_path: Path) -> None:
    assert probe(tmp_path, 1, "stop") == ["stopped", "True", "None", "0", "True", "0"]


@pytest.mark.parametrize(
    ("argv", "started"),
    [
        (["ingest", "run", "--help"], False),
        (["ingest", "records"], False),
        (["ingest"], False),
    ],
)
def test_no_early_start_but_for_run(argv: list[str], started: bool) -> None:
    from ingest.pod import prestart

    assert prestart.start_early(argv) is started


@given(
    path=st.text(st.characters(blacklist_characters="\0", codec="utf-8"), min_size=1, max_size=20),
    form=st.sampled_from(["--config {}", "--config={}", "-c {}", "-c{}"]),
    before=st.lists(st.sampled_from([["--port", "8080"], ["--host", "0.0.0.0"]]), max_size=2),
    after=st.lists(st.sampled_from([["--port", "-c"], ["--log-level", "INFO"]]), max_size=2),
)
def test_the_config_option_is_read_as_click_reads_it(
    path: str, form: str, before: list[list[str]], after: list[list[str]]
) -> None:
    given_ = [form[:-3], path] if form.endswith(" {}") else [form.format(path)]
    args = [a for pair in before for a in pair] + given_ + [a for pair in after for a in pair]
    assert config_option(args) == path
