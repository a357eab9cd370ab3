"""SFTPSource against a real OpenSSH sshd (scripts/services/sshd.sh)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import asyncssh
import pytest

from ingest.sources.sftp import SFTPSource
from tests.conftest import until as wait_for
from tests.integration._fixtures_files import (
    Pump,
    SFTPServer,
    State,
    jsonl,
    record_ids,
    sftp_config,
)

pytestmark = pytest.mark.integration


async def test_skips_files_being_written_and_moves_only_after_commit(
    sftp_server: SFTPServer, sftp_dir: Path, state: State
) -> None:
    (sftp_dir / "old.jsonl").write_bytes(jsonl("old", 150))
    os.utime(sftp_dir / "old.jsonl", (time.time() - 60, time.time() - 60))
    growing = sftp_dir / "growing.jsonl"
    growing.write_bytes(jsonl("g", 50))
    (sftp_dir / "upload.jsonl.part").write_bytes(jsonl("p", 5))
    cfg = sftp_config(sftp_server, sftp_dir, settle_seconds=1.5)
    source = SFTPSource(cfg, state.checkpoints, state.leases, worker_id="w1")
    pump = await Pump(source).start()
    try:
        first = await pump.take(100, commit=False)  # old.jsonl, first batch
        second = await pump.take(1, commit=False)
        assert record_ids(first + second) == [f"old-{i}" for i in range(150)]
        for _ in range(4):  # keep growing.jsonl changing: it must not be taken meanwhile
            await asyncio.sleep(0.4)
            with growing.open("ab") as fh:
                fh.write(jsonl("g", 50 + 10 * (_ + 1), 50 + 10 * _))
        await pump.quiet(0.2)
        assert (sftp_dir / "old.jsonl").exists()  # read, not committed: stays in the inbox
        await source.commit(first[0])
        assert (sftp_dir / "old.jsonl").exists()  # its last batch is not committed yet
        await source.commit(second[0])
        assert not (sftp_dir / "old.jsonl").exists()
        assert (sftp_dir / "processed" / "old.jsonl").read_bytes() == jsonl("old", 150)

        grown = await pump.take(90, timeout=10)  # once settled, the whole file
        assert record_ids(grown) == [f"g-{i}" for i in range(90)]
        await wait_for(lambda: (sftp_dir / "processed" / "growing.jsonl").exists(), 5, "move")
        await pump.quiet(0.5)  # the .part upload is never taken
        (sftp_dir / "upload.jsonl.part").rename(sftp_dir / "upload.jsonl")
        assert record_ids(await pump.take(5, timeout=10)) == [f"p-{i}" for i in range(5)]
        assert source.health().status in ("running", "idle")
    finally:
        await pump.close()
    window = await source.list_window(0, time.time() + 10)
    assert window[0].name == "processed/old.jsonl"  # oldest mtime first
    assert {r.name for r in window} == {
        "processed/old.jsonl",
        "processed/growing.jsonl",
        "processed/upload.jsonl",
    }
    await source.close()


async def test_wrong_host_key_and_refused_login_are_errors_in_health(
    sftp_server: SFTPServer, sftp_dir: Path, state: State, tmp_path: Path
) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    stranger = tmp_path / "stranger"
    stranger.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    cases = [
        (sftp_config(sftp_server, sftp_dir, host_key=other), "host key"),
        (sftp_config(sftp_server, sftp_dir, key_path=stranger), "login refused"),
    ]
    for cfg, words in cases:
        source = SFTPSource(cfg, state.checkpoints, state.leases, worker_id="w1")
        assert source.auth_retry_seconds == 30
        pump = await Pump(source).start()
        try:
            await wait_for(partial(_errored, source), 10, words)
            await asyncio.sleep(0.5)
            health = source.health()
            assert health.status == "error" and len(health.errors) == 1  # retried slowly
            assert words in health.errors[0], health.errors
            assert pump.task is not None and not pump.task.done()
        finally:
            await pump.close()


async def test_lost_connection_reconnects_with_connection_error_in_health(
    sftp_server: SFTPServer, sftp_dir: Path, state: State
) -> None:
    refused = SFTPSource(
        sftp_config(sftp_server, sftp_dir, port=1), state.checkpoints, state.leases, worker_id="w0"
    )
    pump = await Pump(refused).start()
    try:
        await wait_for(lambda: refused.health().status == "error", 10, "error")
        assert "CONNECTION_ERROR" in refused.health().errors[0]
    finally:
        await pump.close()

    (sftp_dir / "one.jsonl").write_bytes(jsonl("one", 3))
    os.utime(sftp_dir / "one.jsonl", (time.time() - 60, time.time() - 60))
    source = SFTPSource(
        sftp_config(sftp_server, sftp_dir), state.checkpoints, state.leases, worker_id="w1"
    )
    pump = await Pump(source).start()
    try:
        assert record_ids(await pump.take(3)) == ["one-0", "one-1", "one-2"]
        # Kill this client's server-side session processes (children of our sshd): the TCP
        # connection drops under the source, as with a network failure.
        sshd_pid = int(Path(os.environ["INGEST_TEST_SFTP_PID_FILE"]).read_text())
        pids = _descendants(sshd_pid)  # "sshd: user [priv]" and its "user@notty" child
        assert len(pids) >= 2, "no sftp session processes found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        await wait_for(
            lambda: any("CONNECTION_ERROR" in e for e in source.health().errors),
            15,
            "CONNECTION_ERROR after the session died",
        )
        (sftp_dir / "two.jsonl").write_bytes(jsonl("two", 2))
        os.utime(sftp_dir / "two.jsonl", (time.time() - 60, time.time() - 60))
        assert record_ids(await pump.take(2, timeout=15)) == ["two-0", "two-1"]
        await wait_for(lambda: (sftp_dir / "processed" / "two.jsonl").exists(), 5, "move")
    finally:
        await pump.close()


def _errored(source: SFTPSource) -> bool:
    return source.health().status == "error"


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    for kid in (int(p) for p in kids.stdout.split()):
        out += [kid, *_descendants(kid)]
    return out


def test_openssh_sftp_lists_the_inbox(sftp_server: SFTPServer, sftp_dir: Path) -> None:
    (sftp_dir / "listed.jsonl").write_bytes(b"{}\n")
    known = sftp_dir.parent.parent / "known_hosts"
    known.write_text(f"[{sftp_server.host}]:{sftp_server.port} {sftp_server.host_key}\n")
    proc = subprocess.run(
        [
            "sftp",
            "-b",
            "-",
            "-i",
            str(sftp_server.key),
            "-P",
            str(sftp_server.port),
            "-o",
            f"UserKnownHostsFile={known}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            f"{sftp_server.user}@{sftp_server.host}",
        ],
        input=f"ls -l {sftp_dir.name}\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "listed.jsonl" in proc.stdout
