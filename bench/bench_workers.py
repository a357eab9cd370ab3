"""All cores of a pod: the two shapes of docs/architecture.md "Scale-out", on the same feed.

The feed: --records JSON lines (default 400k) in --files inbox files of one tenant (default 8),
into the embedded SQLite sink, tenant token bucket opened wide, timed from the files' arrival
until every one is committed (moved to done/). Measured in one run:

  limit      SQLite's own bulk insert of the same rows (bench_embedded.bulk_limit)
  workers=1  `ingest run`, one process (today's shape)
  workers=N  `ingest run` with N full pipeline processes under one control plane (shape a:
             the inbox files are divided by leases)
  pool=P     one process keeps the I/O and the ordering, a pool of P processes decodes the
             batches (shape b, prototyped here: the runner's decode step is sent to a
             ProcessPoolExecutor; bytes in, decoded records pickled back)

Prints records/s, the ratio to the limit and to workers=1, p95 lag, peak RSS (all processes).

    uv run python bench/bench_workers.py [--records 400000] [--files 8] [--workers 2] [--pool 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_embedded import BENCH_CONFIG, bulk_limit, make_lines  # noqa: E402

from tests.e2e._service import ServiceProcess  # noqa: E402

_DECODER = None


def _decode_batch(raws: Sequence[object]) -> list[object]:
    """In a pool process: the runner's decode step for one batch."""
    global _DECODER
    if _DECODER is None:
        from ingest.pipeline.decode import Decoder

        _DECODER = Decoder()
    return _DECODER.decode_many(raws)  # type: ignore[arg-type]


def drop_files(lines: list[bytes], inbox: Path, files: int, stage: Path) -> list[Path]:
    inbox.mkdir(parents=True, exist_ok=True)
    per = -(-len(lines) // files)
    staged = []
    for f in range(files):
        p = stage / f"orders-{f}.jsonl"
        p.write_bytes(b"\n".join(lines[f * per : (f + 1) * per]) + b"\n")
        staged.append(p)
    targets = []
    for p in staged:
        os.replace(p, inbox / p.name)
        targets.append(inbox / p.name)
    return targets


def tree_rss_mb(pid: int) -> float:
    """Peak RSS (VmHWM) of a process and its children, added."""
    total = 0.0
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error, OSError, ValueError):
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
    return total


def p95(metrics: str) -> float | None:
    from bench_embedded import p95_from_histogram

    return p95_from_histogram(metrics)


def run_pod(
    lines: list[bytes], workdir: Path, files: int, workers: int
) -> tuple[float, float | None, float]:
    data = workdir / f"pod{workers}"
    cfg = workdir / f"pod{workers}.yaml"
    cfg.write_text(BENCH_CONFIG + f"workers: {workers}\n")
    svc = ServiceProcess(data, config=cfg).start(wait=120)
    try:
        t0 = time.perf_counter()
        targets = drop_files(lines, data / "inbox" / "acme-corp", files, workdir)
        while any(t.exists() for t in targets):
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        metrics = httpx.get(f"{svc.url}/metrics", timeout=10).text
        assert svc.proc is not None
        rss = tree_rss_mb(svc.proc.pid)
        assert svc.terminate(120) == 0
    finally:
        svc.stop()
    return len(lines) / elapsed, p95(metrics), rss


def run_pool(
    lines: list[bytes], workdir: Path, files: int, pool_size: int
) -> tuple[float, float | None, float]:
    """Shape (b) in this process: the service with its decode step in a process pool."""
    import yaml
    from prometheus_client import generate_latest

    from ingest.config import parse_config
    from ingest.pipeline import runner as runner_mod
    from ingest.service import Service

    data = workdir / f"pool{pool_size}"
    pool = ProcessPoolExecutor(pool_size)
    original = runner_mod.SourceRunner._produce

    async def produce(self: runner_mod.SourceRunner, queue: asyncio.Queue) -> None:  # type: ignore[type-arg]
        loop = asyncio.get_running_loop()
        batches = self.source.batches()
        try:
            while await self._gate():
                nxt = asyncio.ensure_future(anext(batches))
                stop = asyncio.ensure_future(self.stopping.wait())
                await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not nxt.done():
                    nxt.cancel()
                    break
                try:
                    batch = nxt.result()
                except StopAsyncIteration:
                    break
                self.on_pending(len(batch.records))
                await self._admit(batch)
                decoded = await loop.run_in_executor(pool, _decode_batch, batch.records)
                lookup = self.pipeline.prefetch_seen(decoded)
                await queue.put(runner_mod._Decoded(batch, decoded, lookup))
        finally:
            await queue.put(None)

    async def go() -> tuple[float, str]:
        cfg = parse_config({**yaml.safe_load(BENCH_CONFIG), "data_dir": str(data)})
        service = await Service.build(cfg)
        await service.start()
        t0 = time.perf_counter()
        targets = drop_files(lines, data / "inbox" / "acme-corp", files, workdir)
        while any(t.exists() for t in targets):
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
        text = generate_latest(service.metrics.registry).decode()
        await service.shutdown()
        return elapsed, text

    runner_mod.SourceRunner._produce = produce  # type: ignore[method-assign]
    try:
        pool.submit(_decode_batch, []).result()  # start the pool before the clock
        elapsed, metrics = asyncio.run(go())
    finally:
        runner_mod.SourceRunner._produce = original  # type: ignore[method-assign]
        rss = tree_rss_mb(os.getpid())
        pool.shutdown()
    return len(lines) / elapsed, p95(metrics), rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=400_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pool", type=int, default=1, help="decode processes of shape (b); 0: skip")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    try:
        lines = make_lines(args.records)
        print(
            f"machine: {platform.node()} {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, load average {os.getloadavg()}"
        )
        limit = asyncio.run(bulk_limit(lines[:200_000], workdir / "limit.db"))
        print(f"records: {args.records} in {args.files} files; limit (SQLite bulk): {limit:,.0f}/s")
        one, lag1, rss1 = run_pod(lines, workdir, args.files, 1)
        print(
            f"workers=1:  {one:9,.0f} records/s  {one / limit:.2f}x limit  p95 lag <= {lag1} s"
            f"  peak RSS {rss1:.0f} MB"
        )
        n, lag_n, rss_n = run_pod(lines, workdir, args.files, args.workers)
        print(
            f"workers={args.workers}:  {n:9,.0f} records/s  {n / limit:.2f}x limit  "
            f"{n / one:.2f}x workers=1  p95 lag <= {lag_n} s  peak RSS {rss_n:.0f} MB (all)"
        )
        if args.pool:
            b, lag_b, rss_b = run_pool(lines, workdir, args.files, args.pool)
            print(
                f"pool={args.pool}:     {b:9,.0f} records/s  {b / limit:.2f}x limit  "
                f"{b / one:.2f}x workers=1  p95 lag <= {lag_b} s  peak RSS {rss_b:.0f} MB (all)"
            )
        print(f"load average after: {os.getloadavg()}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
