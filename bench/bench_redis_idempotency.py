"""Memory and speed of the Redis idempotency store against plain `SET NX EX` keys.

    uv run python bench/bench_redis_idempotency.py [--url redis://...] [--keys 10000000]
        [--shard-bits B] [--days 8]

Claims N random 32-byte digests in batches through RedisIdempotencyStore, then prints the
INFO used_memory delta per key (and what `stats()` reports), claims/s and seen/s, the Redis
server's CPU per key for claims and lookups (INFO cpu, user + sys: unlike the rates it hardly
moves with the machine's load, so use a Redis of its own), this process's CPU per key around
the store's calls (the client's side: encoding, the event loop, parsing replies), and the
same figures for the naive layout (one pipelined `SET <hex> 1 NX EX ttl` per key, on fewer
keys) measured in the same run, so the ratios compare against what this Redis does flat out.
The claims are spread over `--days` days (default 8: the 7-day window populated, the steady
state; 1 = a service's first day, its first bucket). `--pattern` does what the pipeline does
instead: per batch of new keys a `seen` (every live bucket probed, nothing found) then their
`claim`, so lookups meet the hashes as they fill (the claim-then-lookup order above probes a
full store); `--compare-with DIR` runs the store of another tree (`git archive <commit>
ingest | tar -x -C DIR`) in the same Redis, batch by batch alternated with this one.
Lookups report never-claimed keys (every live bucket probed) and claimed ones apart. Its keys
use a private prefix and are deleted at the end (SCAN). Use a Redis of its own: 10M keys take
a few hundred MB.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import time
from typing import Any

import redis.asyncio as aioredis

from ingest.state.redis import RedisIdempotencyStore, redis_client


def digests(n: int) -> list[bytes]:
    blob = os.urandom(32 * n)
    return [blob[i : i + 32] for i in range(0, 32 * n, 32)]


async def redis_cpu(r: aioredis.Redis) -> float:
    """Seconds of CPU the Redis server has used (user + sys), from INFO cpu."""
    info = await r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def used_memory(r: aioredis.Redis) -> int:
    return int((await r.info("memory"))["used_memory"])


async def unlink_prefix(r: aioredis.Redis, prefix: str) -> None:
    batch: list[bytes] = []
    async for key in r.scan_iter(match=f"{prefix}*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            await r.unlink(*batch)
            batch = []
    if batch:
        await r.unlink(*batch)


def store_class(tree: str | None) -> type[RedisIdempotencyStore]:
    """RedisIdempotencyStore of this tree, or of the tree at `tree` (its module file)."""
    if tree is None:
        return RedisIdempotencyStore
    spec = importlib.util.spec_from_file_location("other_redis", f"{tree}/ingest/state/redis.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls: type[RedisIdempotencyStore] = module.RedisIdempotencyStore
    return cls


async def bench_pattern(
    r: aioredis.Redis, n: int, batch: int, trees: list[str | None], days: int
) -> dict[str | None, dict[str, float]]:
    """The pipeline's order: per batch of new keys `seen` then `claim`, the clock moving over
    `days` days; each tree's store on its own prefix, alternated batch by batch (and which goes
    first), so both meet the same load. Redis CPU and this process's CPU per key."""
    clock = [time.time()]
    stores = {
        t: store_class(t)(r, prefix=f"bench_pat{i}_{os.getpid()}", server_clock=lambda: clock[0])
        for i, t in enumerate(trees)
    }
    acc = {t: [0.0, 0.0, 0.0] for t in trees}
    today = clock[0]
    for done in range(0, n, batch):
        clock[0] = today - (days - 1 - done * days // n) * 86400
        order = trees if (done // batch) % 2 == 0 else trees[::-1]
        for t in order:
            keys = digests(min(batch, n - done))
            c0, p0 = await redis_cpu(r), time.process_time()
            assert not any(await stores[t].seen(keys))
            c1 = await redis_cpu(r)
            await stores[t].claim(keys)
            c2, p1 = await redis_cpu(r), time.process_time()
            a = acc[t]
            a[0], a[1], a[2] = a[0] + c1 - c0, a[1] + c2 - c1, a[2] + p1 - p0
    for i, _ in enumerate(trees):
        await unlink_prefix(r, f"bench_pat{i}_{os.getpid()}")
    return {
        t: {"seen_us": s / n * 1e6, "claim_us": c / n * 1e6, "own_us": o / n * 1e6}
        for t, (s, c, o) in acc.items()
    }


async def bench_store(
    r: aioredis.Redis, n: int, batch: int, seen_n: int, bits: int | None, days: int
) -> dict[str, float]:
    """Claims spread evenly over `days` days up to now (the clock is faked: with 8 and the
    default 7-day TTL the whole window is populated, as in a service in steady state), then
    lookups now: keys never claimed (the common case: new records, every live bucket probed),
    keys claimed on the oldest day (still within the TTL: found in the oldest bucket), and the
    half-and-half mix of earlier rounds."""
    prefix = f"bench_idem_{os.getpid()}"
    clock = [time.time()]
    kw: dict[str, Any] = {} if bits is None else {"shard_bits": bits}
    store = RedisIdempotencyStore(r, prefix=prefix, server_clock=lambda: clock[0], **kw)
    today = clock[0]
    before = await used_memory(r)
    claimed: list[bytes] = []
    t_claim = cpu_claim = own_claim = 0.0
    done = 0
    while done < n:
        chunk = digests(min(batch, n - done))
        clock[0] = today - (days - 1 - done * days // n) * 86400
        c0 = await redis_cpu(r)
        t0, p0 = time.perf_counter(), time.process_time()
        await store.claim(chunk)
        t_claim += time.perf_counter() - t0
        own_claim += time.process_time() - p0
        cpu_claim += await redis_cpu(r) - c0
        done += len(chunk)
        if len(claimed) < seen_n // 2:
            claimed.extend(chunk[: seen_n // 2 - len(claimed)])
    mem = await used_memory(r) - before
    clock[0] = today

    async def lookups(probe: list[bytes]) -> tuple[int, float, float, float]:
        c0 = await redis_cpu(r)
        t0, p0 = time.perf_counter(), time.process_time()
        hits = 0
        for i in range(0, len(probe), batch):
            hits += sum(await store.seen(probe[i : i + batch]))
        t, own = time.perf_counter() - t0, time.process_time() - p0
        return hits, t, await redis_cpu(r) - c0, own

    fresh = digests(seen_n - len(claimed))
    miss_hits, _, cpu_miss, own_miss = await lookups(fresh)
    hit_hits, _, cpu_hit, own_hit = await lookups(claimed)
    mix = [k for pair in zip(claimed, fresh, strict=False) for k in pair]
    mix_hits, t_seen, cpu_seen, _ = await lookups(mix)
    assert miss_hits == 0, f"seen() found {miss_hits} keys never claimed"
    assert hit_hits == len(claimed), f"seen() found {hit_hits} of {len(claimed)} claimed keys"
    assert mix_hits == min(len(claimed), len(fresh))
    stats = await store.stats()
    await unlink_prefix(r, prefix)
    return {
        "keys": n,
        "mem": mem,
        "bpk": mem / n,
        "claim_rate": n / t_claim,
        "seen_rate": len(mix) / t_seen,
        "stats_keys": stats["keys"],
        "stats_bpk": stats["bytes_per_key"],
        "buckets": stats["buckets"],
        "cpu_claim_us": cpu_claim / n * 1e6,
        "cpu_seen_us": cpu_seen / len(mix) * 1e6,
        "cpu_miss_us": cpu_miss / len(fresh) * 1e6,
        "cpu_hit_us": cpu_hit / len(claimed) * 1e6,
        "own_claim_us": own_claim / n * 1e6,
        "own_miss_us": own_miss / len(fresh) * 1e6,
        "own_hit_us": own_hit / len(claimed) * 1e6,
    }


async def bench_raw(r: aioredis.Redis, n: int, batch: int, ttl: int) -> dict[str, float]:
    prefix = f"bench_raw_{os.getpid()}:"
    before = await used_memory(r)
    t = 0.0
    done = 0
    while done < n:
        names = [prefix + d.hex() for d in digests(min(batch, n - done))]
        t0 = time.perf_counter()
        pipe = r.pipeline(transaction=False)
        for name in names:
            pipe.set(name, b"1", nx=True, ex=ttl)
        await pipe.execute()
        t += time.perf_counter() - t0
        done += len(names)
    mem = await used_memory(r) - before
    await unlink_prefix(r, prefix)
    return {"keys": n, "bpk": mem / n, "rate": n / t}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=os.environ.get("INGEST_TEST_REDIS_URL"))
    ap.add_argument("--keys", type=int, default=10_000_000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--seen-keys", type=int, default=1_000_000)
    ap.add_argument("--raw-keys", type=int, default=300_000)
    ap.add_argument("--shard-bits", type=int, default=None, help="default: the store's")
    ap.add_argument(
        "--days", type=int, default=8, help="spread the claims over this many days (8: steady)"
    )
    ap.add_argument("--pattern", action="store_true", help="per batch seen then claim")
    ap.add_argument("--compare-with", default=None, help="with --pattern: another tree's store")
    a = ap.parse_args()
    if not a.url:
        raise SystemExit("set INGEST_TEST_REDIS_URL (scripts/services/redis.sh start) or --url")
    r = redis_client(a.url)
    print(f"load average {os.getloadavg()}")
    if a.pattern:
        trees = [None] if a.compare_with is None else [a.compare_with, None]
        got = await bench_pattern(r, a.keys, a.batch, trees, a.days)
        print(f"pipeline pattern: {a.keys:,} new keys, batch {a.batch}, over {a.days} day(s)")
        for tree, f in got.items():
            both = f["seen_us"] + f["claim_us"]
            print(
                f"{tree or 'this tree':>24}: Redis CPU µs/key seen {f['seen_us']:.2f} + claim "
                f"{f['claim_us']:.2f} = {both:.2f}; client {f['own_us']:.2f}"
            )
        print(f"load average after {os.getloadavg()}")
        await r.aclose()
        return
    raw = await bench_raw(r, a.raw_keys, a.batch, 7 * 86400)
    st = await bench_store(r, a.keys, a.batch, min(a.seen_keys, a.keys), a.shard_bits, a.days)
    bits = a.shard_bits or "the store's default"
    print(f"shard bits {bits}, claims over {a.days} day(s), batch {a.batch}")
    print(f"keys claimed            {st['keys']:>14,.0f}   (stats() says {st['stats_keys']:,.0f})")
    print(f"live buckets (stats)    {st['buckets']:>14,.0f}")
    print(f"used_memory delta       {st['mem']:>14,.0f} B")
    print(f"bytes/key               {st['bpk']:>14.1f}   raw SET NX EX: {raw['bpk']:.1f}")
    print(f"bytes/key, stats()      {st['stats_bpk']:>14.1f}")
    print(f"Redis CPU µs/key claim  {st['cpu_claim_us']:>14.2f}")
    print(f"Redis CPU µs/key seen   {st['cpu_seen_us']:>14.2f}   (half claimed, half not)")
    print(f"  never claimed         {st['cpu_miss_us']:>14.2f}   (new records: every bucket)")
    print(f"  claimed, oldest day   {st['cpu_hit_us']:>14.2f}")
    print(
        f"client CPU µs/key claim {st['own_claim_us']:>14.2f}   (this process: encode, send, parse)"
    )
    print(f"  seen, never claimed   {st['own_miss_us']:>14.2f}")
    print(f"  seen, claimed         {st['own_hit_us']:>14.2f}")
    print(f"claims/s                {st['claim_rate']:>14,.0f}")
    print(f"seen/s                  {st['seen_rate']:>14,.0f}")
    print(f"raw SET NX EX/s         {raw['rate']:>14,.0f}   ({raw['keys']:,.0f} keys, pipelined)")
    print(f"ratio claims/raw        {st['claim_rate'] / raw['rate']:>14.2f}")
    print(f"ratio seen/raw          {st['seen_rate'] / raw['rate']:>14.2f}")
    print(f"memory ratio raw/store  {raw['bpk'] / st['bpk']:>14.1f}")
    await r.aclose()


if __name__ == "__main__":
    asyncio.run(main())
