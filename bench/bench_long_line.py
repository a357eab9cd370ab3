"""A huge line in the inbox: memory, time, and whether the other tenants keep moving.

Reproduces issue 11 item 4: one file of `--size-mb` MB with no newline at all dropped into
tenant `big`, while small files (10 records each) keep arriving for tenants `t-a` and `t-b`
every half second. `ingest run` (embedded) is a process; measured in the same run:

  limit      reading the same file from the page cache in 1 MiB chunks (the physical floor)
  huge line  time from the drop until the file is moved to done/ (its line DLQ'd), the DLQ
             payload stored for it, peak RSS of the service (VmHWM)
  others     records/s and p95 / max latency (drop -> file done) of the small files meanwhile

    uv run python bench/bench_long_line.py [--size-mb 500]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_embedded import BENCH_CONFIG, peak_rss_mb  # noqa: E402

from tests.e2e._service import free_port  # noqa: E402

SMALL_RECORDS = 10


def write_huge(path: Path, size_mb: int) -> None:
    block = b'{"x":"' + b"a" * (1 << 20)
    with path.open("wb") as fh:
        for _ in range(size_mb):
            fh.write(block[: 1 << 20])


def read_limit(path: Path) -> float:
    """Seconds to read the file once in 1 MiB chunks (it is in the page cache by now)."""
    t0 = time.perf_counter()
    with path.open("rb") as fh:
        while fh.read(1 << 20):
            pass
    return time.perf_counter() - t0


def small_file(tenant: str, n: int) -> bytes:
    rows = [
        json.dumps(
            {
                "schema_version": 3,
                "tenant_id": tenant,
                "entity_type": "order",
                "entity_id": f"{tenant}-{n}-{i}",
                "revision": 1,
                "occurred_at": "2025-01-01T00:00:00Z",
                "attributes": {"i": i},
            }
        )
        for i in range(SMALL_RECORDS)
    ]
    return ("\n".join(rows) + "\n").encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-long-line-") as tmp:
        work = Path(tmp)
        data = work / "svc"
        inbox = data / "inbox"
        for tenant in ("big", "t-a", "t-b"):
            (inbox / tenant).mkdir(parents=True)
        staged = work / "huge.jsonl"
        write_huge(staged, args.size_mb)
        limit = read_limit(staged)
        config = work / "bench.yaml"
        config.write_text(BENCH_CONFIG)
        port = free_port()
        env = {**os.environ, "INGEST_DATA_DIR": str(data)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "ingest.cli.ingest", "run", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "WARNING", "--config", str(config)],
            cwd=work, env=env, stdout=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    httpx.get(f"{url}/health/detailed", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            base_rss = peak_rss_mb(proc.pid)
            t0 = time.perf_counter()
            os.replace(staged, inbox / "big" / "huge.jsonl")
            dropped: dict[Path, float] = {}
            latencies: list[float] = []
            n = 0
            huge_done: float | None = None
            next_drop = t0
            while time.perf_counter() - t0 < args.timeout:
                now = time.perf_counter()
                if huge_done is None and not (inbox / "big" / "huge.jsonl").exists():
                    huge_done = now - t0
                for path, at in list(dropped.items()):
                    if not path.exists():
                        latencies.append(now - at)
                        del dropped[path]
                if huge_done is not None and not dropped and n >= 4:
                    break
                if huge_done is None and now >= next_drop:
                    for tenant in ("t-a", "t-b"):
                        tmp_path = work / f"{tenant}-{n}.jsonl"
                        tmp_path.write_bytes(small_file(tenant, n))
                        final = inbox / tenant / tmp_path.name
                        os.replace(tmp_path, final)
                        dropped[final] = time.perf_counter()
                    n += 1
                    next_drop = now + 0.5
                time.sleep(0.02)
            elapsed = time.perf_counter() - t0
            rss = peak_rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        with sqlite3.connect(data / "state.db") as db:
            rows = db.execute(
                "SELECT tenant, reason, length(payload), detail FROM dlq WHERE tenant = 'big'"
            ).fetchall()
    latencies.sort()
    p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan")
    others = len(latencies) * SMALL_RECORDS
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()}")
    print(f"huge line: {args.size_mb} MB, no newline")
    print(f"  limit (read from page cache): {limit:.2f} s")
    if huge_done is None:
        print(f"  NOT DONE after {args.timeout:.0f} s")
    else:
        print(f"  done (moved to done/) after {huge_done:.2f} s, "
              f"ratio to limit {huge_done / limit:.1f}x")
    print(f"  peak RSS {rss:.0f} MB (at start {base_rss:.0f} MB)")
    for tenant, reason, size, detail in rows:
        d = json.loads(detail)
        print(f"  DLQ: {tenant} {reason} payload {size} bytes, kind {d.get('kind')}, "
              f"size {d.get('size')}: {d.get('message')}")
    print(f"other tenants meanwhile: {len(latencies)} files, {others} records in {elapsed:.1f} s "
          f"({others / elapsed:.0f} records/s offered and delivered), latency p95 {p95:.2f} s, "
          f"max {latencies[-1] if latencies else float('nan'):.2f} s, "
          f"{len(dropped)} files never done")


if __name__ == "__main__":
    main()
