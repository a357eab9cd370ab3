"""Overload benchmark: 100 concurrent webhook clients against the embedded service (`make run`).

Each client posts 200-record NDJSON batches for --seconds (default 60) and honours the
Retry-After of a 429. Reports what the front door accepted and refused, what the pipeline
delivered and how late (p50/p95 of ingest_lag_seconds: acceptance -> sink commit), how long
the backlog took to drain after the load stopped, the peak intake backlog in seconds of work,
the peak data dir size, the service's peak RSS, and the delivery rate against SQLite's bulk
insert of the same rows measured in the same run.

    uv run python bench/bench_overload.py [--seconds 60] [--clients 100] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_embedded import bulk_limit, make_lines, peak_rss_mb  # noqa: E402

from tests.e2e._auth import detailed  # noqa: E402
from tests.e2e._load import run_load  # noqa: E402
from tests.e2e._service import ServiceProcess, metric_value  # noqa: E402


def quantile_from_histogram(metrics: str, q: float) -> float | None:
    """The bucket bound under which a share q of ingest_lag_seconds observations fall."""
    count = metric_value(metrics, "ingest_lag_seconds_count")
    bounds = sorted(
        {
            float(ln.split('le="')[1].split('"')[0])
            for ln in metrics.splitlines()
            if ln.startswith("ingest_lag_seconds_bucket{")
        }
    )
    for bound in bounds:
        le = "+Inf" if bound == float("inf") else repr(bound)
        if count and metric_value(metrics, "ingest_lag_seconds_bucket", le=le) >= q * count:
            return bound
    return None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--tenants", type=int, default=1)
    ap.add_argument(
        "--workers", type=int, default=None, help="workers setting (default: the config's)"
    )
    ap.add_argument("--port", type=int, default=18098)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-overload-"))
    data = workdir / "data"
    config = None
    if args.workers is not None:
        config = workdir / "bench.yaml"
        config.write_text(f"workers: {args.workers}\n")
    url = f"http://127.0.0.1:{args.port}"
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}"
        f", load average {os.getloadavg()}"
    )
    limit = asyncio.run(bulk_limit(make_lines(200_000), workdir / "limit.db"))
    svc = ServiceProcess(data, config=config, port=args.port)
    peak = {"dir": 0, "intake_s": 0.0, "intake_records": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(1.0):
            peak["dir"] = max(peak["dir"], dir_bytes(data))
            try:
                intake = detailed(url, 5).json()["backpressure"]
            except (httpx.HTTPError, KeyError, ValueError):
                continue
            intake = intake.get("intake", {})
            peak["intake_s"] = max(peak["intake_s"], intake.get("seconds") or 0.0)
            peak["intake_records"] = max(peak["intake_records"], intake.get("records") or 0)

    try:
        svc.start()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.monotonic()
        load = asyncio.run(
            run_load(
                url,
                clients=args.clients,
                batch=args.batch,
                seconds=args.seconds,
                tenants=args.tenants,
            )
        )
        t_load = time.monotonic()
        while True:
            bp = detailed(url, 10).json()["backpressure"]
            if bp["queue_depth"] == 0 and bp.get("intake", {}).get("records", 0) == 0:
                break
            time.sleep(0.25)
        t_done = time.monotonic()
        stop.set()
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert svc.proc is not None
        rss = peak_rss_mb(svc.proc.pid)
    finally:
        stop.set()
        if svc.proc is not None:
            svc.terminate(120)
    delivered = metric_value(metrics, "ingest_records_total", outcome="delivered")
    duplicate = metric_value(metrics, "ingest_records_total", outcome="duplicate")
    rate = delivered / (t_done - t0)
    s = load.summary()
    print(
        f"clients x batch:        {args.clients} x {args.batch} records, {args.seconds:.0f} s, "
        f"peak concurrency {load.peak_concurrency}"
    )
    print(f"requests:               {s['requests']}  errors {s['errors']}")
    print(
        f"accepted (202):         {load.accepted_records:,} records "
        f"({load.accepted_records / args.seconds:,.0f} rec/s offered-and-taken)"
    )
    print(
        f"refused (429):          {load.refused_records:,} records; Retry-After p50 "
        f"{s['retry_after_p50']} s, max {s['retry_after_max']} s"
    )
    print(
        f"delivered:              {delivered:,.0f} records (duplicates {duplicate:,.0f}); "
        f"every 202'd record: {'yes' if delivered == load.accepted_records else 'NO'}"
    )
    print(f"records/s (delivery):   {rate:,.0f} over load + drain ({t_done - t0:.1f} s)")
    print(f"limit (SQLite bulk):    {limit:,.0f} records/s; ratio {rate / limit:.2f}x")
    print(f"drained after load:     {t_done - t_load:.1f} s")
    print(
        f"lag p50 / p95:          <= {quantile_from_histogram(metrics, 0.5)} s / "
        f"<= {quantile_from_histogram(metrics, 0.95)} s (histogram bucket bounds)"
    )
    print(
        f"peak intake backlog:    {peak['intake_records']:,} records, "
        f"{peak['intake_s']:.1f} s of work"
    )
    print(f"peak data dir:          {peak['dir'] / 2**20:.0f} MiB")
    print(f"peak RSS (service):     {rss:.0f} MB")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
