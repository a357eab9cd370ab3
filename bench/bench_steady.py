"""Lag at steady load: webhooks at 80 % of the measured peak for 5 minutes (embedded mode).

Two phases against one `ingest run` process (embedded: webhook intake and sink on SQLite):
  peak    --peak-clients clients post requests of --peak-batch records (default: --batch, the
          steady phase's size, since a request's fixed cost makes small requests dearer per
          record) as fast as they are answered for --peak-seconds (default: --seconds, as long
          as the steady phase). The peak is what the pipeline *delivered* per second (not what
          the front door took) once the store holds what such a load writes: the mean
          delivered rate of the saturated 10-s intervals in the load's last --peak-window (60)
          s, "populated". Why not the first seconds: a record costs the busy worker ~35 us on
          an empty store and 55-65 us once it holds a million records or more (the timeline
          shows it), so a 30-s peak was ~1.4x what the pipeline sustains for 5 minutes and 80 %
          of it was more than the steady phase could deliver. Also printed: "burst" (delivered
          over the load and its drain, the default before), "sustained" (the mean of the load's
          saturated intervals after the first) and the first 30 s; --basis picks the one the
          share is taken of.
  steady  a paced sender offers --share (0.8) of that peak (or --rate records/s, no peak
          phase), one batch every batch/rate seconds on a fixed schedule (late sends catch
          up, never bunch), for --seconds (300)
  post    (--post-peak-seconds, 60; 0 skips) the peak load again once the steady phase has
          drained: the populated peak on the store the steady phase left. The steady phase
          runs on a store growing from the peak phase's to that one (1.0x -> 1.8x the records
          at the default lengths), so its share of the mean of the two peaks is its share of
          the peak at its own middle store size: the fair figure when the cost grows with the
          store. The store's MB at the steady phase's start and end are printed too.
Lag is `ingest_lag_seconds` (webhook receipt -> sink commit, i.e. from acceptance) over the
steady phase only (histogram delta), p50/p95/p99 interpolated inside the buckets as
Prometheus' histogram_quantile does. Also printed: records/s offered and delivered, the ratio
delivered/peak, the largest service process's peak RSS, load average before and after, and
every --every seconds a timeline line (delivered rate, p95 of the interval, backlog, CPU share
of each process, service CPU per record, the busiest worker's CPU per record by thread: its
event loop ("main") and its SQLite threads, SQLite file sizes), and the service's CPU per record
over the first and the last minute (does the cost grow as the files do?). Each timeline line
also has the machine's VM steal and `runq`, the share of the interval the busiest worker's event
loop was runnable without a core (other processes' load or steal, not the service's waits).
A stall watch (`StallWatch`, --stall-jump) prints a `stall` line for each second the backlog
jumps: every service thread's CPU, run-queue share and the system calls it slept in, plus
py-spy dumps in --stall-log (docs/benchmarks.md, "what a bench_steady stall is made of").
--disk-hog AT:SECONDS makes an ordinary disk hiccup on purpose (bench/disk_hog.py: dd loops of
synced writes beside the data dir) so that a mitigation can be compared in an ABBA; a probe's
4-KiB fdatasync latency says how slow the disk was (inside and outside the hog's window), and
every timeline line has the machine's iowait. --fill-seconds S with --rate loads the store
(saturated, unmeasured) before the steady phase, as the peak phase would.

    uv run python bench/bench_steady.py [--seconds 300] [--share 0.8] [--workers N]
        [--peak-seconds S] [--basis populated|burst|sustained] [--rate R] [--linger S]
        [--post-peak-seconds S]
        [--stall-jump RECORDS] [--stall-log FILE] [--fill-seconds S]
        [--disk-hog AT:SECONDS] [--hog-streams N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_embedded import peak_rss_mb  # noqa: E402
from disk_hog import DiskHog, FsyncProbe  # noqa: E402

from tests.e2e._auth import bearer, sign_headers  # noqa: E402
from tests.e2e._load import batch_body, run_load  # noqa: E402
from tests.e2e._service import ServiceProcess, metric_value  # noqa: E402

TENANT = "acme-corp"
CONFIG = """
admission:
  default_limits: {rate: 10000000, burst: 10000000}
"""


def buckets(metrics: str, name: str = "ingest_lag_seconds") -> dict[float, float]:
    """Cumulative bucket counts by upper bound, summed over every label set."""
    out: dict[float, float] = {}
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="')[1].split('"')[0]
            bound = float("inf") if le == "+Inf" else float(le)
            out[bound] = out.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """histogram_quantile over the difference of two scrapes (linear within a bucket)."""
    delta = sorted((b, after.get(b, 0.0) - before.get(b, 0.0)) for b in after)
    total = delta[-1][1] if delta else 0.0
    if not total:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in delta:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return None


_HTTP = threading.local()


def http() -> httpx.Client:
    """This thread's HTTP client, kept open for the run. `httpx.get` builds a client, and its
    TLS context (built for plain http too), a call: ~42 ms of the bench's CPU each. The stall
    watch reads /metrics and /health/detailed every second, so that was ~9 % of a core taken
    from the service on the 2-core machine, in the steady phase only (docs/benchmarks.md)."""
    client: httpx.Client | None = getattr(_HTTP, "client", None)
    if client is None:
        client = _HTTP.client = httpx.Client(timeout=30)
    return client


def scrape(url: str) -> str:
    """The service's /metrics text."""
    return http().get(f"{url}/metrics").text


def backpressure(url: str) -> dict[str, Any]:
    """`backpressure` of /health/detailed (the intake's backlog, the queue)."""
    found: dict[str, Any] = http().get(f"{url}/health/detailed", headers=bearer()).json()
    bp: dict[str, Any] = found["backpressure"]
    return bp


def delivered(url: str) -> float:
    return metric_value(scrape(url), "ingest_records_total", outcome="delivered")


def wait_drained(url: str) -> None:
    while True:
        bp = backpressure(url)
        if bp["queue_depth"] == 0 and bp.get("intake", {}).get("records", 0) == 0:
            return
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of one process, by thread id (the main thread's id is the
    pid: the worker's event loop; the others are its SQLite threads)."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        out[int(task.name)] = cpu_seconds_of(task / "stat")
    return out


def cpu_seconds_of(stat: Path) -> float:
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dir_mb(path: Path) -> dict[str, float]:
    """Sizes of the data dir's SQLite files (and their WAL), MB."""
    return {f.name: f.stat().st_size / 1e6 for f in sorted(path.glob("**/*.db*")) if f.is_file()}


def store_mb(path: Path) -> float:
    """MB of the SQLite files the records go to (sink, state, idempotency keys; not their
    WALs): what a record's cost grows with."""
    return sum(v for k, v in dir_mb(path).items() if k.endswith(".db"))


def cpu_times() -> tuple[int, int, int]:
    """(steal, total, iowait) jiffies of the whole machine, from /proc/stat's first line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8]), fields[4]


def iowait_share(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Share of the machine's time its cores sat idle waiting for the disk in between."""
    return (after[2] - before[2]) / max(after[1] - before[1], 1)


def runq_seconds(pid: int) -> float:
    """Seconds the process's main thread (a worker's event loop) was runnable but waiting for
    a core (/proc/<pid>/schedstat): other processes' load or the host's steal, not its own
    waits."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def steal_share(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Share of the machine's time the hypervisor gave to others (VM steal) in between."""
    return (after[0] - before[0]) / max(after[1] - before[1], 1)


# x86-64 system call numbers a service thread is seen blocked in (/proc/<pid>/task/<t>/syscall)
SYSCALLS = {
    "0": "read", "1": "write", "7": "poll", "17": "pread", "18": "pwrite", "23": "select",
    "35": "nanosleep", "72": "fcntl", "73": "flock", "74": "fsync", "75": "fdatasync",
    "202": "futex", "230": "clock_nanosleep", "232": "epoll_wait", "281": "epoll_pwait",
    "76": "truncate", "77": "ftruncate", "87": "unlink", "9": "mmap", "11": "munmap",
    "10": "mprotect", "26": "msync", "-1": "-",
}


def thread_states(pid: int, waits: bool = True) -> dict[int, tuple[str, str, float, float]]:
    """(state R/S/D..., the system call it sleeps in, CPU seconds, seconds spent runnable but
    waiting for a core: schedstat) of each thread of one process."""
    out: dict[int, tuple[str, str, float, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for tid in tids:
        task = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            state = fields[0]
            call = "-"
            if waits and state != "R":
                with open(f"{task}/syscall") as f:
                    word = f.read().split(" ", 1)[0].strip()
                call = SYSCALLS.get(word, f"sys{word}") if word != "running" else "-"
            with open(f"{task}/schedstat") as f:
                queued = int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            continue
        out[int(tid)] = (state, call, (int(fields[11]) + int(fields[12])) / tick, queued)
    return out


class StallWatch(threading.Thread):
    """A finer view than the timeline, to show what a stall is made of: every second the
    delivered count and the intake backlog; between them each service thread's state (and
    the system call it sleeps in: futex, flock, fdatasync ...) sampled `hz` times, and its
    CPU and run-queue time (runnable, waiting for a core: other processes' load, not the
    service's own waits). When the backlog jumps by `jump` records in a second (or stays
    above it while delivery is under half the offered rate), it prints a `stall` line (the
    second's delivered rate, backlog, steal, how long the control plane took to answer, and
    each busy or waiting thread) and, if py-spy is on PATH, appends every process's Python
    stacks (`py-spy dump --nonblocking`, which names each thread) to `log`."""

    def __init__(self, svc: ServiceProcess, offered: float, log: Path, jump: float = 5000.0,
                 hz: float = 10.0, max_dumps: int = 40) -> None:
        super().__init__(daemon=True)
        self.svc, self.offered, self.log, self.jump, self.hz = svc, offered, log, jump, hz
        self.max_dumps, self.dumps, self.stalls = max_dumps, 0, 0
        self.done = threading.Event()
        self.spy = shutil.which("py-spy")
        self.names: dict[int, str] = {}  # thread id -> Python thread name (from py-spy)

    def run(self) -> None:
        assert self.svc.proc is not None
        pids = {"ctl": self.svc.proc.pid, **self.svc.worker_pids()}
        t0 = time.monotonic()
        last_t, last_got, last_backlog = t0, delivered(self.svc.url), 0.0
        last_cpu = {n: thread_states(p, False) for n, p in pids.items()}
        last_steal = cpu_times()
        while not self.done.is_set():
            seen: dict[tuple[str, int], dict[str, int]] = {}
            end = last_t + 1.0
            while (now := time.monotonic()) < end and not self.done.is_set():
                for n, p in pids.items():
                    for tid, (state, call, _, _) in thread_states(p).items():
                        key = state if state == "R" else f"{state}:{call}"
                        counts = seen.setdefault((n, tid), {})
                        counts[key] = counts.get(key, 0) + 1
                time.sleep(max(0.0, min(1.0 / self.hz, end - time.monotonic())))
            a = time.monotonic()
            try:
                got = delivered(self.svc.url)
                intake = backpressure(self.svc.url).get("intake", {})
            except (httpx.HTTPError, ValueError):
                break
            answer = time.monotonic() - a
            now = time.monotonic()
            backlog = float(intake.get("records", 0))
            cpu = {n: thread_states(p, False) for n, p in pids.items()}
            steal = cpu_times()
            rate = (got - last_got) / (now - last_t)
            jumped = backlog - last_backlog >= self.jump
            slow = backlog >= self.jump and rate < 0.5 * self.offered
            if jumped or slow:
                self.stalls += 1
                self.report(now - t0, rate, backlog, steal_share(last_steal, steal),
                            iowait_share(last_steal, steal), answer, seen, cpu, last_cpu,
                            now - last_t, pids)
            last_t, last_got, last_backlog, last_cpu, last_steal = now, got, backlog, cpu, steal

    def report(self, t: float, rate: float, backlog: float, steal: float, iowait: float,
               answer: float,
               seen: dict[tuple[str, int], dict[str, int]],
               cpu: dict[str, dict[int, tuple[str, str, float, float]]],
               last_cpu: dict[str, dict[int, tuple[str, str, float, float]]], dt: float,
               pids: dict[str, int]) -> None:
        if self.spy and self.dumps < self.max_dumps:
            self.dumps += 1
            with self.log.open("a") as f:
                f.write(f"=== t={t:.1f}s delivered {rate:,.0f}/s backlog {backlog:,.0f}\n")
                for n, p in pids.items():
                    out = subprocess.run([self.spy, "dump", "--nonblocking", "--pid", str(p)],
                                         text=True,
                                         capture_output=True, timeout=30).stdout
                    f.write(f"--- {n} (pid {p})\n{out}\n")
                    for line in out.splitlines():
                        if line.startswith("Thread "):
                            word = line.split()[1]
                            if word.isdigit():
                                self.names[int(word)] = line.split('"')[1] if '"' in line else ""
        parts = []
        for n in pids:
            for tid, (_, _, c, q) in sorted(cpu[n].items()):
                was = last_cpu[n].get(tid, ("", "", c, q))
                share, queued = (c - was[2]) / dt, (q - was[3]) / dt
                counts = seen.get((n, tid), {})
                total = max(sum(counts.values()), 1)
                waits = sorted(counts.items(), key=lambda kv: -kv[1])
                if share < 0.05 and queued < 0.05 and not any(
                        k.startswith("D") or k in ("S:flock", "S:fsync", "S:fdatasync")
                        or "nanosleep" in k for k, _ in waits[:2]):
                    continue
                name = self.names.get(tid) or ("main" if tid == pids[n] else f"t{tid % 1000}")
                where = " ".join(f"{k} {v / total:.0%}" for k, v in waits[:3])
                parts.append(f"{n}/{name} cpu {share:.0%} runq {queued:.0%} [{where}]")
        print(f"  stall t={t:4.0f}s delivered {rate:7,.0f}/s backlog {backlog:7,.0f} steal "
              f"{steal:.0%} iowait {iowait:.0%} ctl answered in {answer:.2f} s; "
              + "; ".join(parts), flush=True)


class Timeline(threading.Thread):
    """Every `every` seconds: delivered rate, p95 lag of what was delivered in the interval,
    intake backlog, the machine's VM steal, the share of the interval the busiest worker's
    event loop waited for a core (runq), each process's CPU share and the service's CPU per
    delivered record, so a run shows whether delivery decays, whether the cost per record
    grows (CPU per record hardly moves with other people's load, wall-clock rates do), and
    who takes the cores."""

    def __init__(self, svc: ServiceProcess, every: float) -> None:
        super().__init__(daemon=True)
        self.svc, self.every = svc, every
        self.done = threading.Event()
        self.rows: list[dict[str, float]] = []

    def run(self) -> None:
        assert self.svc.proc is not None
        workers = self.svc.worker_pids()
        pids = {"ctl": self.svc.proc.pid, **workers, "bench": os.getpid()}
        service = [n for n in pids if n != "bench"]
        t0 = time.monotonic()

        Sample = tuple[
            float, float, dict[float, float], dict[str, float], dict[str, dict[int, float]]
        ]

        def sample() -> Sample:
            text = scrape(self.svc.url)
            got = metric_value(text, "ingest_records_total", outcome="delivered")
            cpu = {n: cpu_seconds(p) for n, p in pids.items()}
            threads = {n: thread_cpu(p) for n, p in workers.items()}
            return time.monotonic(), got, buckets(text), cpu, threads

        last = sample()
        last_steal = cpu_times()
        last_runq = {n: runq_seconds(p) for n, p in workers.items()}
        while not self.done.wait(self.every):
            now, got, hist, cpu, threads = sample()
            intake = backpressure(self.svc.url).get("intake", {})
            steal_now = cpu_times()
            steal, iowait = steal_share(last_steal, steal_now), iowait_share(last_steal, steal_now)
            last_steal = steal_now
            runq_now = {n: runq_seconds(p) for n, p in workers.items()}
            dt, n = now - last[0], got - last[1]
            p95 = quantile(last[2], hist, 0.95)
            row = {
                "t": now - t0,
                "rate": n / dt,
                "p95": float("nan") if p95 is None else p95,
                "backlog": float(intake.get("records", 0)),
                "us": sum(cpu[k] - last[3][k] for k in service) / max(n, 1) * 1e6,
                "steal": steal,
                "iowait": iowait,
            }
            row.update({f"cpu_{k}": (cpu[k] - last[3][k]) / dt for k in pids})
            self.rows.append(row)
            # the busiest worker's threads, us per delivered record: main (the event loop)
            # first, then its other threads (SQLite's) by id, those above 1 us
            busy = max(workers, key=lambda k: row[f"cpu_{k}"])
            row["runq"] = (runq_now[busy] - last_runq.get(busy, runq_now[busy])) / dt
            last_runq = runq_now
            pid, now_t, last_t = workers[busy], threads[busy], last[4][busy]
            per = {t: (v - last_t.get(t, 0.0)) / max(n, 1) * 1e6 for t, v in now_t.items()}
            parts = [f"main {per.pop(pid, 0.0):.1f}"] + [
                f"t{t % 1000} {v:.1f}" for t, v in sorted(per.items()) if v > 1.0
            ]
            files = ", ".join(f"{k} {v:.0f}" for k, v in dir_mb(self.svc.data_dir).items())
            shares = " ".join(f"{k} {row[f'cpu_{k}']:.0%}" for k in pids)
            print(
                f"  t={row['t']:4.0f}s delivered {row['rate']:7,.0f}/s p95 {row['p95']:6.2f} s"
                f" backlog {row['backlog']:7,.0f} steal {steal:3.0%} iowait {iowait:3.0%}"
                f" runq {row['runq']:3.0%};"
                f" service {row['us']:4.1f} us/rec, cpu {shares};"
                f" {busy} us/rec {' '.join(parts)}; MB {files}",
                flush=True,
            )
            last = (now, got, hist, cpu, threads)

    def cost_drift(self, span: float = 60.0) -> tuple[float, float] | None:
        """Service CPU per record (us) over the first and the last `span` s with deliveries."""
        rows = [r for r in self.rows if r["rate"] > 0]
        if len(rows) < 2:
            return None

        def mean(part: list[dict[str, float]]) -> float:
            return sum(r["us"] * r["rate"] for r in part) / sum(r["rate"] for r in part)

        k = max(1, int(span / self.every))
        return mean(rows[:k]), mean(rows[-k:])


async def paced(
    url: str, rate: float, batch: int, seconds: float
) -> tuple[int, int, int, dict[str, float]]:
    """Offer `rate` records/s as `batch`-record requests on a fixed schedule.
    Returns (accepted, refused, errors) in records, and how the front door answered: the
    latest a request went out after its time ("late", s: the bench's own stall) and the
    slowest answers ("answer_p99", "answer_max", s: time to the 202, not in the lag)."""
    interval = batch / rate
    accepted = refused = errors = 0
    answers: list[float] = []
    late = 0.0
    pending: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=60)

    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def send(n: int) -> None:
            nonlocal accepted, refused, errors
            body = batch_body(TENANT, f"st-{n}", batch)
            sent = time.monotonic()
            try:
                async with session.post(
                    f"{url}/v1/webhooks/{TENANT}/load",
                    data=body,
                    headers=sign_headers(TENANT, body, content_type="application/x-ndjson"),
                ) as resp:
                    await resp.read()
                    answers.append(time.monotonic() - sent)
                    if resp.status == 202:
                        accepted += batch
                    else:
                        refused += batch
            except (aiohttp.ClientError, TimeoutError):
                errors += batch

        start = time.monotonic()
        n = 0
        while (due := start + n * interval) < start + seconds:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            late = max(late, -delay)
            task = asyncio.ensure_future(send(n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
        if pending:
            await asyncio.gather(*pending)
    answers.sort()
    door = {
        "late": late,
        "answer_p99": answers[int(0.99 * (len(answers) - 1))] if answers else float("nan"),
        "answer_max": answers[-1] if answers else float("nan"),
    }
    return accepted, refused, errors, door


def post_peak(svc: ServiceProcess, args: argparse.Namespace) -> float:
    """The populated peak again, on the store the steady phase left: the mean delivered rate
    of the saturated intervals of a load of --post-peak-seconds (the first interval, which
    starts from an empty backlog, left out)."""
    print(f"post peak: {args.peak_clients} clients, {args.peak_batch}-record requests, "
          f"{args.post_peak_seconds:.0f} s")
    timeline = Timeline(svc, args.every)
    timeline.start()
    asyncio.run(run_load(svc.url, clients=args.peak_clients, batch=args.peak_batch,
                         seconds=args.post_peak_seconds, prefix="pp"))
    timeline.done.set()
    timeline.join()
    full = [r["rate"] for r in timeline.rows[1:] if r["backlog"] > 0
            and r["t"] <= args.post_peak_seconds + args.every / 2]
    wait_drained(svc.url)
    return sum(full) / len(full) if full else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--share", type=float, default=0.8)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--peak-seconds", type=float, default=None,
                    help="length of the saturated load (default: --seconds, the steady phase's)")
    ap.add_argument("--peak-window", type=float, default=60.0,
                    help="the populated peak is the mean delivered rate over the saturated "
                    "intervals of the load's last this-many seconds")
    ap.add_argument("--peak-clients", type=int, default=16)
    ap.add_argument("--peak-batch", type=int, default=None, help="default: --batch")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--every", type=float, default=10.0,
                    help="seconds between timeline lines (delivered rate, backlog, CPU)")
    ap.add_argument("--basis", choices=("populated", "burst", "sustained"), default="populated",
                    help="peak the share is taken of: the mean delivered rate of the saturated "
                    "intervals in the load's last --peak-window s, once the store holds what "
                    "the load wrote (populated); delivered over the load and its drain "
                    "(burst); or the mean of the load's saturated intervals after the first "
                    "(sustained)")
    ap.add_argument("--post-peak-seconds", type=float, default=60.0,
                    help="after the steady phase, saturate again for this long: the peak on the "
                    "store the steady phase leaves (0: skip). The steady phase runs on a store "
                    "that grows from what the peak phase left to that: its share of the mean "
                    "of the two peaks is its share of a peak at its middle store size")
    ap.add_argument("--linger", type=float, default=None,
                    help="the webhook source's linger_seconds (default: the config default)")
    ap.add_argument("--rate", type=float, default=None,
                    help="offer this many records/s and skip the peak phase")
    ap.add_argument("--fill-seconds", type=float, default=0.0,
                    help="with --rate: first load the store for this long as the peak phase "
                    "does (saturated, not measured), so the steady phase starts on a store "
                    "of the size it would after a peak phase")
    ap.add_argument("--disk-hog", default=None, metavar="AT:SECONDS",
                    help="an ordinary disk hiccup on purpose: from AT s into the steady phase "
                    "for SECONDS, --hog-streams dd loops of synced 4-MiB writes beside the data "
                    "dir (bench/disk_hog.py); the fdatasync latency inside and outside the "
                    "window is printed")
    ap.add_argument("--hog-streams", type=int, default=4)
    ap.add_argument("--stall-jump", type=float, default=5000.0,
                    help="steady phase: a second in which the backlog grows by this many records "
                    "(or stays above it while delivery is under half the offered rate) prints a "
                    "`stall` line (each service thread's CPU and kernel waits); 0: no watch")
    ap.add_argument("--stall-log", type=Path, default=None,
                    help="where stalls' `py-spy dump`s go (py-spy on PATH; default: "
                    "/tmp/bench-steady-stalls-<pid>.txt)")
    args = ap.parse_args()
    args.peak_batch = args.peak_batch or args.batch
    if args.peak_seconds is None:
        args.peak_seconds = args.seconds
    workdir = Path(tempfile.mkdtemp(prefix="bench-steady-"))
    config = workdir / "bench.yaml"
    text = CONFIG + (f"workers: {args.workers}\n" if args.workers is not None else "")
    if args.linger is not None:
        text += f"sources: [{{type: webhook, linger_seconds: {args.linger}}}]\n"
    config.write_text(text)
    print(f"machine: {platform.node()} {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; uptime: {subprocess.getoutput('uptime').strip()}")
    svc = ServiceProcess(workdir / "data", config=config)
    hog: DiskHog | None = None
    try:
        svc.start()
        url = svc.url
        peak = float("nan")
        if args.rate is not None and args.fill_seconds > 0:
            print(f"fill: {args.peak_clients} clients, {args.peak_batch}-record requests, "
                  f"{args.fill_seconds:.0f} s")
            asyncio.run(run_load(url, clients=args.peak_clients, batch=args.peak_batch,
                                 seconds=args.fill_seconds, prefix="fl"))
            wait_drained(url)
        if args.rate is None:
            print(f"peak: {args.peak_clients} clients, {args.peak_batch}-record requests, "
                  f"{args.peak_seconds:.0f} s")
            t0 = time.monotonic()
            timeline = Timeline(svc, args.every)
            timeline.start()
            asyncio.run(run_load(url, clients=args.peak_clients, batch=args.peak_batch,
                                 seconds=args.peak_seconds, prefix="pk"))
            wait_drained(url)
            timeline.done.set()
            timeline.join()
            burst = delivered(url) / (time.monotonic() - t0)
            full = [r["rate"] for r in timeline.rows[1:] if r["backlog"] > 0]
            sustained = sum(full) / len(full) if full else burst
            first = [r["rate"] for r in timeline.rows if r["t"] <= 30.0 + args.every / 2]
            late = [r["rate"] for r in timeline.rows if r["backlog"] > 0
                    and args.peak_seconds - args.peak_window < r["t"]
                    <= args.peak_seconds + args.every / 2]
            populated = sum(late) / len(late) if late else float("nan")
            print(f"peak: burst (delivered over {args.peak_seconds:.0f} s load + drain) "
                  f"{burst:,.0f} rec/s; sustained (mean of {len(full)} saturated intervals "
                  f"after the first) {sustained:,.0f} rec/s; first 30 s "
                  f"{sum(first) / max(len(first), 1):,.0f} rec/s; populated (mean of "
                  f"{len(late)} saturated intervals in the last {args.peak_window:.0f} s) "
                  f"{populated:,.0f} rec/s")
            peak = {"burst": burst, "sustained": sustained, "populated": populated}[args.basis]
            if peak != peak:  # nan: the load's last window never had a backlog
                print("peak: the load did not saturate the pipeline at its end; using burst")
                peak = burst
        mb_start = store_mb(svc.data_dir)
        rate = args.share * peak if args.rate is None else args.rate
        share = "--rate" if peak != peak else f"{rate / peak:.0%} of the {args.basis} peak"
        print(f"steady: offering {rate:,.0f} rec/s ({share}) "
              f"in {args.batch}-record requests for {args.seconds:.0f} s")
        before = buckets(scrape(url))
        got0 = delivered(url)
        t1 = time.monotonic()
        timeline = Timeline(svc, args.every)
        timeline.start()
        log = args.stall_log or Path(f"/tmp/bench-steady-stalls-{os.getpid()}.txt")
        watch = StallWatch(svc, rate, log, jump=args.stall_jump)
        if args.stall_jump > 0:
            watch.start()
        probe = FsyncProbe(workdir)
        probe.start()
        if args.disk_hog:
            at, span = (float(x) for x in args.disk_hog.split(":"))
            hog = DiskHog(workdir, at, span, args.hog_streams)
            hog.start()
        accepted, refused, errors, door = asyncio.run(
            paced(url, rate, args.batch, args.seconds)
        )
        wait_drained(url)
        if hog is not None:
            hog.stop()
        probe.stop()
        timeline.done.set()
        timeline.join()
        watch.done.set()
        if watch.is_alive():
            watch.join()
        steals = [r["steal"] for r in timeline.rows]
        elapsed = time.monotonic() - t1
        metrics = scrape(url)
        after = buckets(metrics)
        got = delivered(url) - got0
        mb_end = store_mb(svc.data_dir)
        post = float("nan")
        if args.post_peak_seconds > 0 and args.rate is None:
            post = post_peak(svc, args)
        assert svc.proc is not None
        rss = max(peak_rss_mb(p) for p in [svc.proc.pid, *svc.worker_pids().values()])
        drift = timeline.cost_drift()
    finally:
        if hog is not None:
            hog.stop()
        if svc.proc is not None:
            svc.terminate(120)
        shutil.rmtree(workdir, ignore_errors=True)
    p50, p95, p99 = (quantile(before, after, q) for q in (0.5, 0.95, 0.99))
    bounds = sorted(b for b in after if b != float("inf"))
    of_peak = "" if peak != peak else f", {got / elapsed / peak:.2f}x of the {args.basis} peak"
    print(f"offered {rate:,.0f} rec/s for {args.seconds:.0f} s: accepted {accepted:,} refused "
          f"{refused:,} errors {errors:,} records; delivered {got:,.0f} in {elapsed:.0f} s "
          f"({got / elapsed:,.0f} rec/s{of_peak})")
    print(f"front door: 202 answered in p99 {door['answer_p99']:.3f} s, max "
          f"{door['answer_max']:.3f} s; a request went out at most {door['late']:.3f} s late")
    print(f"lag from acceptance: p50 {p50:.3f} s, p95 {p95:.3f} s, p99 {p99:.3f} s "
          f"(histogram buckets {bounds[0]}..{bounds[-1]} s, {len(bounds)} bounds)")
    if drift:
        print(f"service CPU per record: {drift[0]:.1f} us over the first minute, "
              f"{drift[1]:.1f} us over the last ({drift[1] / drift[0]:.2f}x)")
    print(f"stores (sink, state, keys; no WAL): {mb_start:,.0f} MB as the steady phase began "
          f"(the peak phase's end), {mb_end:,.0f} MB at its end")
    if post == post:
        mid = (peak + post) / 2
        print(f"peak after the steady phase (populated, {args.post_peak_seconds:.0f} s): "
              f"{post:,.0f} rec/s ({post / peak:.2f}x the first); offered {rate / mid:.0%} and "
              f"delivered {got / elapsed / mid:.2f}x of their mean (the peak at the steady "
              f"phase's middle store size)")
    print(f"peak RSS (largest service process): {rss:.0f} MB")
    if steals:
        print(f"VM steal over the steady phase: {sum(steals) / len(steals):.1%} mean, "
              f"{max(steals):.0%} in the worst {args.every:.0f}-s interval; "
              f"{watch.stalls} stall seconds"
              + (f", py-spy dumps in {log}" if watch.dumps else ""))
    if hog is not None and hog.window is not None:
        w = hog.window
        print(f"disk hog t={w[0] - t1:.0f}-{w[1] - t1:.0f} s ({args.hog_streams} streams, "
              f"{hog.written_mb:,} MB synced): 4-KiB fdatasync {probe.summary(w)}; "
              f"outside it {probe.summary(w, inside=False)}")
    else:
        print(f"4-KiB fdatasync over the steady phase: {probe.summary()}")
    print(f"uptime after: {subprocess.getoutput('uptime').strip()}")


if __name__ == "__main__":
    main()
