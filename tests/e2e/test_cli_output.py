"""What the operator CLIs print into a pipe or a log: whole words, one-line errors, data as data.

The runbook's commands run the way a script, `| grep` or a CI log sees them (stdout and stderr
are pipes): rich used to draw for 80 columns there, so table cells came out as `compl…` and
`OLDER_REVIS…` and errors broke over lines; and it read `[...]` in records as its markup, so a
record whose entity id held `[/]` made `dlqtriage sample`/`analyze` and `ingest records` end in
a traceback (MarkupError), as did any error message quoting such an argument.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.e2e._service import ServiceProcess

pytestmark = pytest.mark.e2e
TENANT = "acme-corp"
BIN = Path(sys.executable).parent
MARKUP_ID = "o[/]1"  # rich's closing tag with nothing to close


def v3(entity_id: str, revision: Any, **attrs: Any) -> dict[str, Any]:
    return {"schema_version": 3, "tenant_id": TENANT, "entity_type": "order",
            "entity_id": entity_id, "revision": revision,
            "occurred_at": "2025-01-01T00:00:00Z", "attributes": attrs or {"amount": 1.0}}


FEED = [
    v3("[bold]ok-1", 1, note="[red]not a style[/]"),  # lands in the sink
    v3(MARKUP_ID, "[bold]x"),  # SCHEMA_DRIFT: revision is a string
    v3("x-1", 5), v3("x-1", 3),  # OLDER_REVISION
]


def run(tool: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("INGEST_DATA_DIR", "INGEST_CONFIG", "COLUMNS")}
    return subprocess.run([str(BIN / tool), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL,
                          env={**env, "INGEST_ACTOR": "alice"})


def dlq_count(data: Path) -> int:
    with sqlite3.connect(data / "state.db", timeout=10) as db:
        return int(db.execute("SELECT count(*) FROM dlq").fetchone()[0])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """<root>/data as the embedded service left it after FEED (the service stopped)."""
    root = tmp_path_factory.mktemp("cli-output")
    svc = ServiceProcess(root / "data").start()
    try:
        inbox = svc.data_dir / "inbox" / TENANT
        inbox.mkdir(parents=True, exist_ok=True)
        (inbox / ".orders.tmp").write_text("".join(json.dumps(r) + "\n" for r in FEED))
        (inbox / ".orders.tmp").rename(inbox / "orders.jsonl")
        wait_for(lambda: dlq_count(svc.data_dir) == 2, what="2 DLQ entries")
        assert svc.terminate() == 0
    finally:
        svc.stop()
    yield root


def one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for word in words:
        assert word in lines[0], r.stderr


def test_records_that_look_like_markup_are_shown_as_written(root: Path) -> None:
    r = run("dlqtriage", root, "sample", "--reason", "SCHEMA_DRIFT", "--full")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"order/{MARKUP_ID} revision None" in r.stdout
    assert '"revision": "[bold]x"' in r.stdout
    r = run("dlqtriage", root, "analyze", "--tenant", TENANT)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert MARKUP_ID in r.stdout
    r = run("ingest", root, "records", "--tenant", TENANT)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "[bold]ok-1" in r.stdout and "[red]not a style[/]" in r.stdout


def test_piped_tables_keep_whole_words(root: Path) -> None:
    r = run("dlqtriage", root, "analyze", "--tenant", TENANT)
    assert r.returncode == 0, r.stderr
    assert "OLDER_REVISION" in r.stdout and "…" not in r.stdout
    # the summary's first line is one line, whatever its length
    r = run("dlqtriage", root, "summary", "--tenant", TENANT)
    first = r.stdout.splitlines()[0]
    assert first.startswith("DLQ summary (tenant acme-corp): 2 entries") and "SLO" in first
    r = run("replayctl", root, "plan", "--tenant", TENANT, "--from", "2025-01-01T00:00:00Z",
            "--to", "2025-01-02T00:00:00Z", "--sources", "inbox-dropped", "--throttle", "100")
    assert r.returncode == 0, r.stderr
    plan = r.stdout.splitlines()[0]
    r = run("replayctl", root, "list", "--tenant", TENANT)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if plan in line)
    assert "pending_approval" in row and TENANT in row and "inbox-dropped" in row, r.stdout
    r = run("replayctl", root, "status", plan)
    assert r.returncode == 0 and "inbox-dropped" in r.stdout and "…" not in r.stdout, r.stdout


def test_errors_are_one_line_and_quote_arguments_as_given(root: Path) -> None:
    one_line_error(run("dlqtriage", root, "sample", "--reason", "BOGUS"), 2,
                   "unknown reason code 'BOGUS'", "CIRCUIT_OPEN")
    one_line_error(run("replayctl", root, "status", "rp-[/]x"), 2, "no plan rp-[/]x")
    one_line_error(run("replayctl", root, "plan", "--tenant", TENANT, "--from", "[bold]soon",
                       "--to", "2025-01-02T00:00:00Z", "--sources", "inbox-dropped"),
                   2, "--from '[bold]soon' is not an ISO date-time")
    one_line_error(run("dlqtriage", root, "summary", "-c", str(root / "missing [/].yaml")), 2,
                   "missing [/].yaml")
    # usage errors too (Typer drew them in an 80-column box after the usage line)
    one_line_error(run("dlqtriage", root, "purge", "--reason", "OLDER_REVISION"), 2,
                   "Missing option '--older-than' (see `dlqtriage purge --help`)")
    one_line_error(run("dlqtriage", root, "sample", "--limit", "abc"), 2,
                   "Invalid value for '--limit'", "unable to parse string as an integer")
    one_line_error(run("replayctl", root, "run", "rp-1"), 2, "Missing option '--plan'")
    one_line_error(run("replayctl", root, "frobnicate"), 2, "No such command 'frobnicate'")
    r = run("dlqtriage", root)  # no command: the help, as before
    assert r.returncode == 2 and "summary" in r.stdout + r.stderr


def test_a_mistyped_tenant_is_told_apart_from_a_clean_one(root: Path) -> None:
    r = run("dlqtriage", root, "summary", "--tenant", "acme-crop")
    assert r.returncode == 0, r.stderr
    assert "0 entries" in r.stdout
    assert r.stderr.startswith(
        "warning: no DLQ entry and no processed record for tenant 'acme-crop' in this store"
    ), r.stderr
    r = run("dlqtriage", root, "summary", "--tenant", TENANT)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = run("replayctl", root, "list", "--tenant", "acme-crop")
    assert r.returncode == 0, r.stderr
    assert "no replay plans of tenant 'acme-crop' in this store" in r.stderr
    one_line_error(run("replayctl", root, "list", "--tenant", "Acme Corp"), 2,
                   "--tenant 'Acme Corp' is not a valid tenant name")


def test_idempotency_stats_from_the_wrong_directory_creates_nothing(tmp_path: Path) -> None:
    r = run("ingest", tmp_path, "idempotency-stats")
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stderr.startswith("error: sqlite state store at ") and "does not exist" in r.stderr
    assert not (tmp_path / "data").exists()


def test_idempotency_stats_where_the_service_ran(root: Path) -> None:
    r = run("ingest", root, "idempotency-stats", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["keys"] >= 2
