"""CPU per key of the embedded (SQLite) idempotency store as the day's keys grow.

    uv run python bench/bench_idem_sqlite.py [--keys 2000000] [--batch 2000] [--every 250000]

Claims batches of random 32-byte keys into a fresh `state.db` (in a temporary directory) the
way the pipeline does, `seen()` then `claim()` of the same batch, one day, default TTL, and
prints for every `--every` keys: CPU per key of the whole process and of the store's SQLite
thread alone (`seen`: the thread's CPU in seen(); `time.process_time` / `time.thread_time`:
a shared machine disturbs CPU time far less than wall time), wall time per key, the slowest
seen()+claim() of the window (what a batch may wait behind a merge), and the keys in each
table at the end of the window (where the store keeps them). Nothing else runs in the
process. `--mid-keys N` sets the store's `mid_keys` (the keys moved into `idem_mid` before it
becomes a run), `--recent-keys N` its `recent_keys` (the keys waiting in the claims log before
they are merged into `idem_mid`), `--slice-keys N` its `slice_keys` (the keys one merge
transaction moves). `--writer HZ` adds what the service has beside the store: another
connection (the control plane's) appending a 30 kB intake row HZ times a second, whose commits
reset the store connection's page cache (SQLite drops a connection's cached pages whenever
another connection committed since its last read). `--stores N` claims through N stores, each
with its own connection and thread on the one file, in turn (a pod's N workers: each one's
filter learns the others' claims from the log, and each one's commits reset the others' page
caches); the CPU figures are then summed over the N threads. `--disk-hog AT:SECONDS` keeps
the disk busy meanwhile (bench/disk_hog.py): "p99 ms" and "worst ms" (a seen() + claim()'s
wall time) then show how long claims stop while the disk is slow. `--runs N` measures only
what N runs (merges' slices, 20 keys each) cost: the schema parsed again, the listing, a new
store's `seen`; `--prefill N` puts N such runs in the file before the claims (a store at
N runs' worth of keys). Runs are written as the code under test writes them: slices in
tables of slices (`_slice_table`), or a table each (the code before). "merge ms" and
"drop ms": the longest merge and drop transaction of the window (each holds the file's
writer lock from start to end), wall / CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from disk_hog import DiskHog, FsyncProbe  # noqa: E402

from ingest.state import sqlite_idem  # noqa: E402
from ingest.state.sqlite import _IDEM_DAY_DDL, DAY, SQLiteDB, _wal_frames, immediate  # noqa: E402
from ingest.state.sqlite_idem import SQLiteIdempotencyStore, idem_run, idem_tables  # noqa: E402

# The layout of the code under test: tables of slices, or a table a run (the code before).
SLICED = hasattr(sqlite_idem, "_slice_table")


def prefill(c: sqlite3.Connection, runs: int, now: float, keys_a_run: int = 20) -> bytes:
    """N runs of `keys_a_run` random keys claimed at `now`, in the layout of the code under
    test, the claims log's ids set to start after them; the oldest run's first key."""
    oldest = os.urandom(32)
    c.execute("BEGIN")
    day = int(now // DAY)
    group = getattr(sqlite_idem, "GROUP_SLICES", 1)
    for n in range(runs):
        rows = [(os.urandom(32), now) for _ in range(keys_a_run)]
        if n == 0:
            rows[0] = (oldest, now)
        if SLICED:
            table = sqlite_idem.idem_slices(day, 10 + n - n % group)
            c.execute(sqlite_idem._SLICES_DDL.format(table))
            c.executemany(f"INSERT INTO {table} VALUES ({n % group}, ?, ?)", rows)
        else:
            run = idem_run(day, 10 + n)
            c.execute(_IDEM_DAY_DDL.format(run))
            c.executemany(f"INSERT INTO {run} VALUES (?, ?)", rows)
    c.execute("INSERT INTO idem_log (claimed_at, keys) VALUES (0, x'')")  # makes the sequence
    c.execute("DELETE FROM idem_log")
    c.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'idem_log'", (runs + 100,))
    c.execute("UPDATE idem_log_merged SET through = ?", (runs + 100,))
    c.execute("COMMIT")
    return oldest


class Holds:
    """The longest merge and drop transactions (wall, CPU of the thread) since the last
    `take`, timed around the store's `_merge` and `_drop_expired` (each one transaction)."""

    def __init__(self) -> None:
        self.worst: dict[str, tuple[float, float]] = {}
        for name in ("_merge", "_drop_expired"):
            self._wrap(name)

    def _wrap(self, name: str) -> None:
        inner = getattr(SQLiteIdempotencyStore, name)

        def timed(store: Any, *args: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return inner(store, *args)
            finally:
                took = (time.perf_counter() - wall, time.thread_time() - cpu)
                self.worst[name] = max(self.worst.get(name, (0.0, 0.0)), took)

        setattr(SQLiteIdempotencyStore, name, timed)

    def take(self, name: str) -> str:
        wall, cpu = self.worst.pop(name, (0.0, 0.0))
        return f"{wall * 1e3:.0f}/{cpu * 1e3:.0f}"


def tables(c: sqlite3.Connection) -> dict[str, int]:
    names = [
        n
        for (n,) in c.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'idem_*'"
            " ORDER BY name"
        )
    ]
    return {n: c.execute(f"SELECT count(*) FROM {n}").fetchone()[0] for n in names}


def table_counts(counts: dict[str, int]) -> str:
    """The idempotency tables' row counts; the runs (one a merge, hundreds of them) and the
    tables of slices as their number and keys, the others by name."""
    runs = [v for k, v in counts.items() if k[5:6].isdigit()]
    sliced = [v for k, v in counts.items() if k[5:6] == "s" and k[6:7].isdigit()]
    named = " ".join(
        f"{k}={v:,}" for k, v in counts.items() if not k[5:6].isdigit() and not k[6:7].isdigit()
    )
    return (
        f"runs={len(runs):,} ({sum(runs):,} keys) sliced={len(sliced):,} ({sum(sliced):,}) {named}"
    )


async def many_runs(runs: int, keys_a_run: int = 20) -> None:
    """`--runs N`: what N runs (tables) in the file cost, whatever their size (the schema is
    what grows): a connection's open and first statement, the schema parsed again after
    another connection's change (as each merge makes every other worker do), the runs'
    listing (`idem_tables`), a new store's first `seen` (its filter built from every run)
    and its `seen` of a claimed key in the oldest run (probed in every run). CPU of the
    calling thread (a store's own thread for the store's figures)."""
    layout = "tables of slices" if SLICED else "a table a run"
    print(f"{runs:,} runs of {keys_a_run} keys ({layout}); load average {os.getloadavg()}")
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.db"
        db = await SQLiteDB.open(path)
        oldest = await db.run(lambda c: prefill(c, runs, now, keys_a_run))

        def best(fn: Any, times: int = 5) -> float:
            spent = []
            for _ in range(times):
                t = time.thread_time()
                fn()
                spent.append(time.thread_time() - t)
            return min(spent) * 1e3

        def first_statement() -> None:
            c = sqlite3.connect(path)
            c.execute("SELECT 1 FROM idem_log LIMIT 1").fetchall()
            c.close()

        a = sqlite3.connect(path, isolation_level=None)
        b = sqlite3.connect(path, isolation_level=None)
        changes = iter(range(1000))

        def parse_again() -> float:
            a.execute(f"CREATE TABLE x{next(changes)} (k)")
            t = time.thread_time()
            b.execute("SELECT 1 FROM idem_log LIMIT 1").fetchall()
            return time.thread_time() - t

        b.execute("SELECT 1 FROM idem_log LIMIT 1").fetchall()
        print(
            f"open + first statement {best(first_statement):.2f} ms; schema parsed again after"
            f" another connection's change {min(parse_again() for _ in range(5)) * 1e3:.2f} ms;"
            f" idem_tables {best(lambda: idem_tables(b)):.2f} ms"
        )
        a.close()
        b.close()
        store = SQLiteIdempotencyStore(db, clock=lambda: now)
        cpu = await db.run(lambda _c: time.thread_time())
        fresh = await store.seen([os.urandom(32)])
        built = await db.run(lambda _c: time.thread_time()) - cpu
        try:
            found = await store.seen([oldest])
            probed = await db.run(lambda _c: time.thread_time()) - cpu - built
            probe = f"{found} in {probed * 1e3:.1f} ms"
        except Exception as exc:  # the figure is the error (main: too many runs a statement)
            probe = f"{type(exc).__name__}: {exc}"
        print(
            f"a new store's first seen (filter built) {built * 1e3:.0f} ms {fresh}; its seen"
            f" of a key in the oldest run: {probe}"
        )
        # every run expired (8 days on): the drops, a transaction at a time, as claims make them
        later = SQLiteIdempotencyStore(db, clock=lambda: now + 8 * DAY)
        times: list[tuple[float, float]] = []

        def drop(c: sqlite3.Connection) -> None:
            wall, cpu = time.perf_counter(), time.thread_time()
            with immediate(c):
                later._drop_expired(c, now + 8 * DAY)
            times.append((time.perf_counter() - wall, time.thread_time() - cpu))

        while not times or await db.run(lambda c: bool(idem_tables(c))):
            await db.run(drop)
        walls, cpus = [w * 1e3 for w, _ in times], [u * 1e3 for _, u in times]
        print(
            f"every run expired: dropped in {len(times)} transactions, longest"
            f" {max(walls):.0f} ms wall / {max(cpus):.0f} ms CPU, all {sum(walls):.0f} /"
            f" {sum(cpus):.0f}"
        )
        await db.close()


async def append_intake(path: Path, hz: float, stop: asyncio.Event) -> None:
    """Another connection's commits, as the control plane's intake appends."""
    other = await SQLiteDB.open(path)
    body = os.urandom(30_000)
    sql = "INSERT INTO intake (tenant, source, n_records, received_at, body) VALUES (?,?,?,?,?)"
    try:
        while not stop.is_set():
            await other.run(lambda c: c.execute(sql, ("t", "s", 100, time.time(), body)))
            await asyncio.sleep(1 / hz)
    finally:
        await other.close()


async def main(
    keys: int,
    batch: int,
    every: int,
    mid_keys: int | None,
    writer: float,
    recent_keys: int | None = None,
    slice_keys: int | None = None,
    stores: int = 1,
    disk_hog: str | None = None,
    prefilled: int = 0,
) -> None:
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"load average {os.getloadavg()}"
    )
    print(
        f"{keys:,} keys in claims of {batch:,} (seen() then claim()), a window per {every:,}"
        f"; intake appends from another connection: {writer:g}/s; {stores} store(s) in turn"
    )
    if prefilled:
        layout = "tables of slices" if SLICED else "a table a run"
        print(f"the file prefilled with {prefilled:,} runs of 20 keys ({layout})")
    head = ("keys", "cpu us/key", "thread", "seen", "wall", "p99 ms", "worst ms")
    head2 = ("merge ms", "drop ms")
    print("{:>10} {:>10} {:>8} {:>6} {:>8} {:>7} {:>9} {:>9} {:>8}  tables".format(*head, *head2))
    holds = Holds()
    with tempfile.TemporaryDirectory() as tmp:
        dbs = [await SQLiteDB.open(Path(tmp) / "state.db") for _ in range(stores)]
        db = dbs[0]
        if prefilled:
            await db.run(lambda c: prefill(c, prefilled, time.time()))
        extra: dict[str, Any] = {} if mid_keys is None else {"mid_keys": mid_keys}
        if recent_keys is not None:
            extra["recent_keys"] = recent_keys
        if slice_keys is not None:
            extra["slice_keys"] = slice_keys
        all_stores = [SQLiteIdempotencyStore(d, **extra) for d in dbs]

        async def thread_cpu() -> float:
            return sum([await d.run(lambda _c: time.thread_time()) for d in dbs])

        stop = asyncio.Event()
        appender = (
            asyncio.ensure_future(append_intake(Path(tmp) / "state.db", writer, stop))
            if writer
            else None
        )
        hog = probe = None
        if disk_hog:
            at, span = (float(x) for x in disk_hog.split(":"))
            probe = FsyncProbe(Path(tmp))
            probe.start()
            hog = DiskHog(Path(tmp), at, span)
            hog.start()
        done = 0
        first_cpu = time.process_time()
        first_thread = await thread_cpu()
        turn = 0
        while done < keys:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            thread0 = await thread_cpu()
            seen = 0.0
            times: list[float] = []
            n = 0
            while n < every and done + n < keys:
                blob = os.urandom(32 * batch)
                ks = [blob[i : i + 32] for i in range(0, len(blob), 32)]
                t = time.perf_counter()
                store, sdb = all_stores[turn % stores], dbs[turn % stores]
                turn += 1
                s0 = await sdb.run(lambda _c: time.thread_time())
                await store.seen(ks)
                seen += await sdb.run(lambda _c: time.thread_time()) - s0
                await store.claim(ks)
                times.append(time.perf_counter() - t)
                n += batch
            thread1 = await thread_cpu()
            cpu1, wall1 = time.process_time(), time.perf_counter()
            done += n
            counts = await db.run(tables)
            times.sort()
            p99, worst = times[int(0.99 * (len(times) - 1))], times[-1]
            print(
                f"{done:>10,} {(cpu1 - cpu0) / n * 1e6:>10.1f} "
                f"{(thread1 - thread0) / n * 1e6:>8.1f} {seen / n * 1e6:>6.1f} "
                f"{(wall1 - wall0) / n * 1e6:>8.1f} {p99 * 1e3:>7.0f} "
                f"{worst * 1e3:>9.0f} {holds.take('_merge'):>9} {holds.take('_drop_expired'):>8}  "
                + table_counts(counts),
                flush=True,
            )
        stop.set()
        if appender is not None:
            await appender
        if hog is not None and probe is not None:
            hog.stop()
            probe.stop()
            print(
                f"disk hog ({hog.written_mb:,} MB synced): 4-KiB fdatasync "
                f"{probe.summary(hog.window)}; outside it {probe.summary(hog.window, False)}"
            )
        last_thread = await thread_cpu()
        total = time.process_time() - first_cpu
        print(
            f"all {done:,} keys: {total / done * 1e6:.1f} us/key CPU, state thread "
            f"{(last_thread - first_thread) / done * 1e6:.1f}; "
            f"file {sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20:.0f} MiB"
        )
        for d in dbs:
            cp = await d.run(lambda c: getattr(c, "checkpointer", None))
            frames = await d.run(_wal_frames)
            if cp is not None:
                print(
                    f"checkpointer: {cp.passes} passes, {cp.locked} under the writer lock, "
                    f"{cp.deferred} tails left for later (disk slow); WAL frames {frames}"
                )
            await d.close()
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=2_000_000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--every", type=int, default=250_000)
    ap.add_argument("--mid-keys", type=int, help="the store's mid_keys (default: its own)")
    ap.add_argument("--recent-keys", type=int, help="the store's recent_keys (default: its own)")
    ap.add_argument("--slice-keys", type=int, help="the store's slice_keys (default: its own)")
    ap.add_argument(
        "--writer",
        type=float,
        default=0.0,
        help="intake appends a second from another connection (0: none)",
    )
    ap.add_argument(
        "--stores",
        type=int,
        default=1,
        help="stores (connections, threads) claiming in turn on the one file (a pod's workers)",
    )
    ap.add_argument(
        "--disk-hog",
        metavar="AT:SECONDS",
        help="synced writes beside the file from AT s for SECONDS (bench/disk_hog.py)",
    )
    ap.add_argument(
        "--runs",
        type=int,
        help="only measure what this many runs (merges' slices) in the file cost (no claims)",
    )
    ap.add_argument(
        "--prefill",
        type=int,
        default=0,
        help="runs of 20 keys put in the file before the claims (a store at N runs' worth)",
    )
    a = ap.parse_args()
    if a.runs:
        asyncio.run(many_runs(a.runs))
        sys.exit()
    asyncio.run(
        main(
            a.keys,
            a.batch,
            a.every,
            a.mid_keys,
            a.writer,
            a.recent_keys,
            a.slice_keys,
            a.stores,
            a.disk_hog,
            a.prefill,
        )
    )
