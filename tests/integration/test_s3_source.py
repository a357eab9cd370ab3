"""S3Source against a real SeaweedFS S3 server (scripts/services/seaweedfs.sh)."""

from __future__ import annotations

import asyncio
import collections
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson
import pytest

from ingest.sources.s3 import S3Source
from ingest.state.leases import LeaseStore, PostgresLeaseStore, SQLiteLeaseStore
from ingest.state.postgres import migrate
from ingest.state.sqlite import SQLiteDB
from tests.conftest import until as wait_for
from tests.integration._fixtures_files import (
    BUCKET,
    Pump,
    State,
    jsonl,
    put,
    record_ids,
    s3_config,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


async def test_killed_worker_mid_object_resumes_exactly_once(
    s3: Any, s3_endpoint: str, prefix: str, tmp_path: Path
) -> None:
    """A worker process is SIGKILLed holding an uncommitted batch mid-object; after the lease
    TTL another worker resumes at the committed offset: every record committed exactly once."""
    for i in range(3):
        await put(s3, f"{prefix}obj-{i}.jsonl", jsonl(f"o{i}", 500))
    db_path, out = tmp_path / "state.db", tmp_path / "committed.txt"
    await (await SQLiteDB.open(db_path)).close()  # create it before two processes share it
    args = {
        "db": str(db_path),
        "endpoint": s3_endpoint,
        "prefix": prefix,
        "worker": "w-dead",
        "ttl": 1.5,
        "commit": 7,
        "out": str(out),
    }
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration._fixtures_files",
            "s3-child",
            orjson.dumps(args).decode(),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env=os.environ.copy(),
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
        assert line.strip() == b"READY", line
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    before = out.read_text().split()
    assert len(before) == 700  # obj-0 whole, obj-1 up to line 200

    db = await SQLiteDB.open(db_path)
    st = State(db)
    source = S3Source(
        s3_config(s3_endpoint, prefix), st.checkpoints, st.leases, worker_id="w-new", lease_ttl=1.5
    )
    pump = await Pump(source).start()
    try:
        t0 = time.monotonic()
        batches = await pump.take(800)
        took_over_after = time.monotonic() - t0
        await pump.quiet(1.0)
    finally:
        await pump.close()
        await db.close()
    after = record_ids(batches)
    counts = collections.Counter(before + after)
    expected = {f"o{i}-{n}" for i in range(3) for n in range(500)}
    assert set(counts) == expected
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
    assert next(i for i in after if i.startswith("o1-")) == "o1-200"  # mid-object resume
    assert took_over_after > 0.5  # waited for the dead worker's lease to lapse


async def test_same_worker_restart_retakes_its_unreleased_lease_at_once(
    s3: Any, s3_endpoint: str, prefix: str, state: State
) -> None:
    """Crashed without releasing its lease (no close), a worker restarted under the same id
    takes the object back at once, not after the 60 s TTL. Resuming at the committed record
    with nothing skipped or doubled is the source contract's (test_source_contract.py)."""
    await put(s3, f"{prefix}a.jsonl", jsonl("a", 350))
    cfg = s3_config(s3_endpoint, prefix)
    assert cfg.lease_ttl_seconds == 60
    first = await Pump(S3Source(cfg, state.checkpoints, state.leases, worker_id="w1")).start()
    await first.take(200)
    await first.take(1, commit=False)  # read, not committed: must come again
    await first.kill()  # crash: no release, no close
    await first.source.close_client()  # only the HTTP client, so no warning about it leaks
    cp = await state.checkpoints.load("acme", "s3-test")
    assert cp is not None and cp["key"] == f"{prefix}a.jsonl" and cp["offset"] > 0
    second = await Pump(S3Source(cfg, state.checkpoints, state.leases, worker_id="w1")).start()
    try:
        assert record_ids(await second.take(150, timeout=15))[0] == "a-200"
        await second.quiet(0.8)
        health = second.source.health()
        assert health.lag_seconds == 0.0
        assert health.last_checkpoint is not None and health.last_checkpoint["offset"] == len(
            jsonl("a", 350)
        )
    finally:
        await second.close()


async def test_late_low_key_and_changed_etag_are_read(
    s3: Any, s3_endpoint: str, prefix: str, state: State
) -> None:
    await put(s3, f"{prefix}m.jsonl", jsonl("m", 10))
    await put(s3, f"{prefix}z.jsonl", jsonl("z", 10))
    cfg = s3_config(s3_endpoint, prefix)
    pump = await Pump(S3Source(cfg, state.checkpoints, state.leases, worker_id="w1")).start()
    try:
        first = record_ids(await pump.take(20))
        assert sorted(first) == sorted(
            [f"m-{i}" for i in range(10)] + [f"z-{i}" for i in range(10)]
        )
        await put(s3, f"{prefix}a.jsonl", jsonl("a", 5))  # sorts below everything seen
        assert record_ids(await pump.take(5)) == [f"a-{i}" for i in range(5)]
        new_etag = await put(s3, f"{prefix}m.jsonl", jsonl("m2", 3))  # same key, new content
        batches = await pump.take(3)
        assert record_ids(batches) == ["m2-0", "m2-1", "m2-2"]
        assert batches[0].records[0].position["etag"] == new_etag
        await pump.quiet(1.0)  # z and a are not read again
        done = await state.leases.done_versions("s3-test")
        assert done[f"{prefix}m.jsonl"] == new_etag and len(done) == 3
    finally:
        await pump.close()


async def test_corrupt_gzip_objects_keep_what_reads_and_report_the_rest(
    s3: Any, s3_endpoint: str, prefix: str, state: State
) -> None:
    blob = gzip.compress(jsonl("g", 20000), compresslevel=1)
    cut = len(blob) // 2
    flipped = blob[:cut] + bytes(b ^ 0x55 for b in blob[cut : cut + 64]) + blob[cut + 64 :]
    await put(s3, f"{prefix}a-truncated.jsonl.gz", blob[:cut])
    await put(s3, f"{prefix}b-flipped.jsonl.gz", flipped)
    await put(s3, f"{prefix}c-good.csv", b"tenant_id,entity_type,entity_id,revision\nacme,u,1,3\n")
    cfg = s3_config(s3_endpoint, prefix, batch_size=5000)
    pump = await Pump(S3Source(cfg, state.checkpoints, state.leases, worker_id="w1")).start()
    try:
        batches: list[Any] = []
        while not any(r.position["key"].endswith(".csv") for b in batches for r in b.records):
            batches += await pump.take(1)
    finally:
        await pump.close()
    records = [r for b in batches for r in b.records]
    for name in ("a-truncated.jsonl.gz", "b-flipped.jsonl.gz"):
        mine = [r for r in records if r.position["key"] == prefix + name]
        rejects = [r for r in mine if "reject" in r.meta]
        assert len(rejects) == 1 and rejects[0] is mine[-1], name  # reading stops at the damage
        rej = rejects[0].meta["reject"]
        assert rej["kind"] == "corrupt_object" and rej["key"] == prefix + name
        assert "gzip" in rej["message"] and rej["offset"] > 0
        assert [r.data for r in mine[:2]] == [b'{"id":"g-0","n":0}', b'{"id":"g-1","n":1}']
    trunc = [r for r in records if r.position["key"].endswith("a-truncated.jsonl.gz")]
    ids = [orjson.loads(r.data)["id"] for r in trunc[:-1]]
    assert 1000 < len(ids) < 20000 and ids == [f"g-{i}" for i in range(len(ids))]
    assert "truncated" in trunc[-1].meta["reject"]["message"]
    csv_rec = next(r for r in records if r.position["key"].endswith(".csv"))
    assert csv_rec.decoded is not None and csv_rec.decoded["tenant_id"] == "acme"
    assert csv_rec.tenant == "acme" and csv_rec.source == "s3-test"
    assert abs(csv_rec.event_time - time.time()) < 120


class _Attempts:
    """The lease store, counting the lease attempts that came back empty (delegates all)."""

    def __init__(self, store: LeaseStore) -> None:
        self._store = store
        self.lost = 0

    async def acquire(self, *args: Any) -> int | None:
        got = await self._store.acquire(*args)
        self.lost += got is None
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def test_workers_of_a_pod_read_their_stripes_and_lose_few_lease_attempts(
    s3: Any, s3_endpoint: str, prefix: str, state: State, tmp_path: Path
) -> None:
    """Worker i of n tries items i, i+n, ... first: two workers over 200 objects each read
    each object once, and few lease attempts are lost (walking one list in one order, about
    half of the 400 were)."""
    await _put_200(s3, prefix)
    store, closer = await _lease_store(tmp_path)
    leases = _Attempts(store)
    cfg = s3_config(s3_endpoint, prefix, name=f"s3-stripes-{prefix[:-1]}", batch_size=10)
    pumps = [
        await Pump(
            S3Source(cfg, state.checkpoints, leases, worker_id=f"w{i}", shard=(i, 2))  # type: ignore[arg-type]
        ).start()
        for i in range(2)
    ]
    by_key, seen = await _drain(pumps, 5000, closer)
    assert len(by_key) == 200 and all(len(owners) == 1 for owners in by_key.values())
    assert len(seen) == 5000 and len(set(seen)) == 5000
    # walking one list in one order, the two lost 200 of their ~400 attempts
    assert leases.lost < 40, leases.lost


async def test_a_worker_alone_reads_the_other_stripes_too(
    s3: Any, s3_endpoint: str, prefix: str, state: State, tmp_path: Path
) -> None:
    """Worker 0 of 2 with no worker 1 running (gone, or not started yet) still reads every
    object: the stripes order its attempts, they do not divide the work."""
    for i in range(9):
        await put(s3, f"{prefix}{i:03d}.jsonl", jsonl(f"y{i}", 3))
    store, closer = await _lease_store(tmp_path)
    cfg = s3_config(s3_endpoint, prefix, name=f"s3-alone-{prefix[:-1]}", batch_size=4)
    pump = await Pump(S3Source(cfg, state.checkpoints, store, worker_id="w0", shard=(0, 2))).start()
    ids: list[str] = []
    try:
        while len(ids) < 27:
            b = await pump.next(timeout=5.0)
            await pump.source.commit(b)
            ids += [orjson.loads(r.data)["id"] for r in b.records]
    finally:
        await pump.close()
        await closer()
    assert sorted(ids) == sorted(f"y{i}-{n}" for i in range(9) for n in range(3))
    # its own stripe (objects 0, 2, 4, 6, 8) first, then the others'
    order = list(dict.fromkeys(i.split("-")[0] for i in ids))
    assert order == ["y0", "y2", "y4", "y6", "y8", "y1", "y3", "y5", "y7"]


async def _lease_store(tmp_path: Path) -> tuple[LeaseStore, Any]:
    url = os.environ.get("INGEST_TEST_POSTGRES_URL")
    if url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
        await migrate(pool)
        store = PostgresLeaseStore(pool)
        return store, pool.close
    db = await SQLiteDB.open(tmp_path / "leases.db")
    return SQLiteLeaseStore(db), db.close


async def _put_200(s3: Any, prefix: str) -> None:
    """200 objects of 25 lines each."""
    sem = asyncio.Semaphore(16)

    async def upload(i: int) -> None:
        async with sem:
            await put(s3, f"{prefix}{i:03d}.jsonl", jsonl(f"x{i}", 25))

    await asyncio.gather(*(upload(i) for i in range(200)))


async def _drain(
    pumps: list[Pump], total: int, closer: Any
) -> tuple[dict[str, set[str]], list[str]]:
    """Commit what the pumps read until `total` records or 3 s of nothing, then close them
    and the lease store (`closer`): each object's readers (worker ids), the ids read."""
    by_key: dict[str, set[str]] = collections.defaultdict(set)
    seen: list[str] = []

    async def drain(p: Pump) -> None:
        while len(seen) < total:
            try:
                b = await p.next(timeout=3.0)
            except AssertionError:
                return
            await p.source.commit(b)
            for r in b.records:
                by_key[r.position["key"]].add(p.source._worker)
                seen.append(orjson.loads(r.data)["id"])

    try:
        await asyncio.gather(*(drain(p) for p in pumps))
    finally:
        for p in pumps:
            await p.close()
        await closer()
    return by_key, seen


async def test_two_workers_take_each_of_200_objects_once(
    s3: Any, s3_endpoint: str, prefix: str, state: State, tmp_path: Path
) -> None:
    await _put_200(s3, prefix)
    leases, closer = await _lease_store(tmp_path)
    cfg = s3_config(s3_endpoint, prefix, name=f"s3-pair-{prefix[:-1]}", batch_size=10)
    pumps = [
        await Pump(S3Source(cfg, state.checkpoints, leases, worker_id=w)).start()
        for w in ("w1", "w2")
    ]
    by_key, seen = await _drain(pumps, 5000, closer)
    assert len(by_key) == 200
    assert all(len(owners) == 1 for owners in by_key.values())
    assert len(seen) == 5000 and len(set(seen)) == 5000
    per_worker = collections.Counter(next(iter(o)) for o in by_key.values())
    assert per_worker["w1"] > 10 and per_worker["w2"] > 10, per_worker


async def test_list_window_health_and_lag(
    s3: Any, s3_endpoint: str, prefix: str, state: State
) -> None:
    await put(s3, f"{prefix}w1.jsonl", jsonl("w", 3))
    t_mid = time.time() + 1.2
    await asyncio.sleep(2.2)  # LastModified has whole seconds
    await put(s3, f"{prefix}w2.jsonl", jsonl("v", 3))
    source = S3Source(
        s3_config(s3_endpoint, prefix), state.checkpoints, state.leases, worker_id="w1"
    )
    assert [r.name for r in await source.list_window(0, t_mid)] == [f"{prefix}w1.jsonl"]
    assert [r.name for r in await source.list_window(t_mid, time.time() + 5)] == [
        f"{prefix}w2.jsonl"
    ]
    pump = await Pump(source).start()
    try:
        first = await pump.take(6, commit=False)
        assert len(first) == 1  # a batch runs across objects: w1's 3 lines and w2's 3
        assert [i[0] for i in first[0].position["items"]] == [
            f"{prefix}w1.jsonl",
            f"{prefix}w2.jsonl",
        ]
        assert source.health().lag_seconds >= 2.0  # w1 not committed yet
        for b in first:
            await source.commit(b)
        await wait_for(lambda: source.health().lag_seconds == 0.0, 5, "lag back to 0")
        assert source.health().as_dict()["records_read"] == 6
    finally:
        await pump.close()


async def test_unreachable_endpoint_is_a_connection_error_in_health(state: State) -> None:
    cfg = s3_config("http://127.0.0.1:1", "p/")
    source = S3Source(cfg, state.checkpoints, state.leases, worker_id="w1")
    pump = await Pump(source).start()
    try:
        await wait_for(lambda: source.health().status == "error", 20, "status error")
        assert "CONNECTION_ERROR" in source.health().errors[0]
        assert pump.task is not None and not pump.task.done()  # retrying, not crashed
    finally:
        await pump.close()


async def test_aws_cli_lists_the_prefix(s3: Any, s3_endpoint: str, prefix: str) -> None:
    await put(s3, f"{prefix}sub/one.jsonl", b"{}\n")
    await put(s3, f"{prefix}two.jsonl", b"{}\n{}\n")
    proc = await asyncio.create_subprocess_exec(
        "aws",
        "s3",
        "ls",
        f"s3://{BUCKET}/{prefix}",
        "--recursive",
        "--endpoint-url",
        s3_endpoint,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert [ln.split()[-1] for ln in lines] == [f"{prefix}sub/one.jsonl", f"{prefix}two.jsonl"]
    assert [ln.split()[2] for ln in lines] == ["3", "6"]


async def test_a_paused_source_lists_leases_and_gets_nothing_until_resumed(
    s3: Any, s3_endpoint: str, prefix: str, state: State
) -> None:
    """An operator's pause (the runner calls `pause()` while the read waits for objects)
    holds the S3 source: objects put meanwhile are not listed, leased nor fetched; on
    `resume()` they are read at once, each line once."""
    source = S3Source(s3_config(s3_endpoint, prefix), state.checkpoints, state.leases,
                      worker_id="w1")  # fmt: skip
    calls: collections.Counter[str] = collections.Counter()
    list_items, open_item = source.list_items, source.open_item

    async def counted_list() -> Any:
        calls["list"] += 1
        return await list_items()

    def counted_open(ref: Any, start: int) -> Any:
        calls["get"] += 1
        return open_item(ref, start)

    source.list_items = counted_list  # type: ignore[method-assign]
    source.open_item = counted_open  # type: ignore[method-assign]
    pump = await Pump(source).start()
    try:
        await wait_for(lambda: source.health().status == "idle")  # listed the empty prefix
        await source.pause()
        await asyncio.sleep(0.3)  # a listing in flight at the pause ends
        before = calls["list"]
        for name in ("a", "b", "c"):
            await put(s3, f"{prefix}{name}.jsonl", jsonl(name, 40))
        await asyncio.sleep(1.0)  # 5 polls of an unheld source
        assert (calls["list"], calls["get"]) == (before, 0)
        leased = await state.db.run(
            lambda c: c.execute("SELECT count(*) FROM source_leases").fetchone()[0]
        )
        assert leased == 0 and not source._items
        assert pump.queue.empty()
        await source.resume()
        batches = await pump.take(120, timeout=10)
        assert sorted(record_ids(batches)) == sorted(
            f"{n}-{i}" for n in ("a", "b", "c") for i in range(40)
        )
    finally:
        await pump.close()
