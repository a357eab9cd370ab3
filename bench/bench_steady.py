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
The summary lists each service thread's CPU per delivered record over the steady phase's first
and last minute (named by py-spy: the control plane's event loop and SQLite threads, each
worker's event loop, decoder and SQLite threads), so a rise shows where it is. --keep-data DIR
keeps the data dir, --data-from DIR starts on a copy of one (a populated store for each side
of an A/B without its fill's minutes; --tag makes the new entity ids differ from the kept
store's, which would be duplicates, never written). A worker started on a populated store builds
its key filter from the tables first (~20 s for 7M keys) and that filter's false positives are
probed in every run, not its own runs': compare such runs with each other.

    uv run python bench/bench_steady.py [--seconds 300] [--share 0.8] [--workers N]
        [--peak-seconds S] [--basis populated|burst|sustained] [--rate R] [--linger S]
        [--post-peak-seconds S]
        [--stall-jump RECORDS] [--stall-log FILE] [--fill-seconds S]
        [--disk-hog AT:SECONDS] [--hog-streams N] [--keep-data DIR] [--data-from DIR]
        [--tag TAG]
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


class ThreadStates:
    """(state R/S/D..., the system call it sleeps in, CPU seconds, seconds spent runnable but
    waiting for a core: schedstat) of each thread of one process, read through descriptors
    kept open: the stall watch reads them 10 times a second for ~20 threads, and opening
    three /proc files a thread each time (a path lookup, an open, a read and a close each)
    cost the bench 1.6 ms of CPU a sweep, ~1.6 % of a core in the steady phase only, taken
    from the service it measures (docs/benchmarks.md); a kept descriptor is read again with
    one `pread`. The thread list is read again every `relist` sweeps (threads come and go
    rarely: a worker's executor threads start once)."""

    def __init__(self, pid: int, relist: int = 10) -> None:
        self.pid, self.relist, self.sweeps = pid, relist, 0
        self.fds: dict[int, dict[str, int]] = {}

    def close(self) -> None:
        for fds in self.fds.values():
            for fd in fds.values():
                os.close(fd)
        self.fds = {}

    def _list(self) -> None:
        try:
            tids = {int(t) for t in os.listdir(f"/proc/{self.pid}/task")}
        except OSError:
            tids = set()
        for tid in set(self.fds) - tids:
            for fd in self.fds.pop(tid).values():
                os.close(fd)
        for tid in tids - set(self.fds):
            fds: dict[str, int] = {}
            try:
                for name in ("stat", "syscall", "schedstat"):
                    fds[name] = os.open(f"/proc/{self.pid}/task/{tid}/{name}", os.O_RDONLY)
            except OSError:
                for fd in fds.values():
                    os.close(fd)
                continue
            self.fds[tid] = fds

    def read(self, waits: bool = True) -> dict[int, tuple[str, str, float, float]]:
        if self.sweeps % self.relist == 0:
            self._list()
        self.sweeps += 1
        out: dict[int, tuple[str, str, float, float]] = {}
        tick = os.sysconf("SC_CLK_TCK")
        for tid, fds in list(self.fds.items()):
            try:
                fields = os.pread(fds["stat"], 1024, 0).decode().rsplit(")", 1)[1].split()
                state = fields[0]
                call = "-"
                if waits and state != "R":
                    word = os.pread(fds["syscall"], 256, 0).decode().split(" ", 1)[0].strip()
                    call = SYSCALLS.get(word, f"sys{word}") if word != "running" else "-"
                queued = int(os.pread(fds["schedstat"], 256, 0).split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                continue
            out[tid] = (state, call, (int(fields[11]) + int(fields[12])) / tick, queued)
        return out


def thread_states(pid: int, waits: bool = True) -> dict[int, tuple[str, str, float, float]]:
    """`ThreadStates(pid).read(waits)` once."""
    states = ThreadStates(pid)
    try:
        return states.read(waits)
    finally:
        states.close()


class StallWatch(threading.Thread):
    """A finer view than the timeline, to show what a stall is made of: every second the
    delivered count and the queue (the intake's backlog and the records in the workers);
    between them each service thread's state (and the system call it sleeps in: futex,
    flock, fdatasync ...) sampled `hz` times (`ThreadStates`), and its CPU and run-queue time
    (runnable, waiting for a core: other processes' load, not the service's own waits). When
    the queue jumps by `jump` records in a second (or stays above it while delivery is under
    half the offered rate), it prints a `stall` line (the second's delivered rate, queue,
    steal, how long the control plane took to answer, and
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
        states = {n: ThreadStates(p) for n, p in pids.items()}
        try:
            self.watch(pids, states)
        finally:
            for st in states.values():
                st.close()

    def watch(self, pids: dict[str, int], states: dict[str, ThreadStates]) -> None:
        t0 = time.monotonic()
        last_t, last_got, last_backlog = t0, delivered(self.svc.url), 0.0
        last_cpu = {n: states[n].read(False) for n in pids}
        last_steal = cpu_times()
        while not self.done.is_set():
            seen: dict[tuple[str, int], dict[str, int]] = {}
            end = last_t + 1.0
            while (now := time.monotonic()) < end and not self.done.is_set():
                for n in pids:
                    for tid, (state, call, _, _) in states[n].read().items():
                        key = state if state == "R" else f"{state}:{call}"
                        counts = seen.setdefault((n, tid), {})
                        counts[key] = counts.get(key, 0) + 1
                time.sleep(max(0.0, min(1.0 / self.hz, end - time.monotonic())))
            a = time.monotonic()
            try:
                # one read a second: /metrics has both (the pod's queue depth: the intake's
                # backlog and the records in the workers); each read costs the control plane
                # and both workers ~1-1.5 ms of CPU (they send fresh reports), /health/detailed
                # as much again
                text = scrape(self.svc.url)
            except (httpx.HTTPError, ValueError):
                break
            answer = time.monotonic() - a
            now = time.monotonic()
            got = metric_value(text, "ingest_records_total", outcome="delivered")
            backlog = metric_value(text, "ingest_queue_depth")
            cpu = {n: states[n].read(False) for n in pids}
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
        print(f"  stall t={t:4.0f}s delivered {rate:7,.0f}/s queue {backlog:7,.0f} steal "
              f"{steal:.0%} iowait {iowait:.0%} ctl answered in {answer:.2f} s; "
              + "; ".join(parts), flush=True)


def thread_names(pids: dict[str, int]) -> dict[int, str]:
    """Thread id -> Python thread name of the service's processes, from `py-spy dump` (empty
    without py-spy on PATH, or once the processes are gone)."""
    spy = shutil.which("py-spy")
    names: dict[int, str] = {}
    for pid in pids.values() if spy else ():
        try:
            out = subprocess.run([spy, "dump", "--nonblocking", "--pid", str(pid)], text=True,
                                 capture_output=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            if line.startswith("Thread ") and line.split()[1].isdigit():
                names[int(line.split()[1])] = line.split('"')[1] if '"' in line else ""
    return names


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
        # each interval's CPU seconds of every service thread, (process, thread id), and
        # ("delivered", 0): the records delivered in it (`thread_drift`)
        self.thread_rows: list[dict[tuple[str, int], float]] = []
        self.pids: dict[str, int] = {}

    def run(self) -> None:
        assert self.svc.proc is not None
        workers = self.svc.worker_pids()
        self.pids = {"ctl": self.svc.proc.pid, **workers}
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
            threads = {n: thread_cpu(p) for n, p in pids.items() if n != "bench"}
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
            self.thread_rows.append({
                (k, t): v - last[4][k].get(t, 0.0) for k in threads for t, v in threads[k].items()
            } | {("delivered", 0): float(n)})
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

    def thread_drift(self, span: float = 60.0) -> list[tuple[str, float, float]]:
        """Each service thread's CPU per delivered record (us) over the first and the last
        `span` s with deliveries, named by py-spy where it can (`thread_names`): which
        thread's cost grows with the store."""
        rows = [r for r in self.thread_rows if r.get(("delivered", 0), 0.0) > 0]
        if len(rows) < 2:
            return []
        k = max(1, int(span / self.every))
        names = thread_names(self.pids)

        def per(part: list[dict[tuple[str, int], float]], key: tuple[str, int]) -> float:
            n = sum(r[("delivered", 0)] for r in part)
            return sum(r.get(key, 0.0) for r in part) / max(n, 1.0) * 1e6

        keys = sorted({k for r in rows for k in r if k[0] != "delivered"})
        out = []
        for key in keys:
            first, last = per(rows[:k], key), per(rows[-k:], key)
            if max(first, last) >= 0.3:
                name = names.get(key[1]) or ("main" if key[1] == self.pids.get(key[0]) else
                                             f"t{key[1]}")
                out.append((f"{key[0]}/{name}", first, last))
        return out

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
    url: str, rate: float, batch: int, seconds: float, tag: str = ""
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
            body = batch_body(TENANT, f"{tag}st-{n}", batch)
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
                         seconds=args.post_peak_seconds, prefix=f"{args.tag}pp"))
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
    ap.add_argument("--data-from", type=Path, default=None,
                    help="start the service on a copy of this data dir (one --keep-data left): "
                    "a populated store without its fill's minutes, the same for each side of "
                    "an A/B")
    ap.add_argument("--keep-data", type=Path, default=None,
                    help="move the data dir here once the service stopped (for --data-from)")
    ap.add_argument("--tag", default="",
                    help="put before every entity id: new entities on a --data-from store whose "
                    "run used other tags (the same ids would be duplicates, never written)")
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
    if args.data_from is not None:
        shutil.copytree(args.data_from, workdir / "data",
                        ignore=shutil.ignore_patterns("service-*.log"))
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
                                 seconds=args.fill_seconds, prefix=f"{args.tag}fl"))
            wait_drained(url)
        if args.rate is None:
            print(f"peak: {args.peak_clients} clients, {args.peak_batch}-record requests, "
                  f"{args.peak_seconds:.0f} s")
            t0 = time.monotonic()
            timeline = Timeline(svc, args.every)
            timeline.start()
            asyncio.run(run_load(url, clients=args.peak_clients, batch=args.peak_batch,
                                 seconds=args.peak_seconds, prefix=f"{args.tag}pk"))
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
            paced(url, rate, args.batch, args.seconds, args.tag)
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
        threads = timeline.thread_drift()
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
        if args.keep_data is not None:
            shutil.rmtree(args.keep_data, ignore_errors=True)
            shutil.move(workdir / "data", args.keep_data)
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
    for name, first, last in threads:
        print(f"  {name:<40} {first:5.2f} -> {last:5.2f} us/rec ({last - first:+.2f})")
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
