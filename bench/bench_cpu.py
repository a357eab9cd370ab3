"""Python CPU per record, stage by stage, on the same rows (no servers, no I/O).

Each stage runs over the whole feed (default 200k records, the benchmarks' shared rows from
`bench_embedded.make_lines`) a few times; the best run is reported in µs per record, with the
garbage collector on (the service runs with it on), as CPU time of the process
(`time.process_time`), which a loaded machine disturbs far less than wall time. Stages:

  read         JSON-lines bytes -> `RawRecord`s (the inbox's line reader)
  decode+check bytes -> typed Struct compiled from the schema: parse, version (the upgrade
               check: a v3 record needs none), types, patterns, bounds, in one pass
  validate     the rules left: tenant, known attributes, occurred_at (format, future)
  dedupe key   the body dict (built in sorted key order, as the decoder builds it), its
               canonical bytes (orjson, OPT_SORT_KEYS) and SHA-256
  record       building the `Record`s the pipeline carries
  decoder      `Decoder.decode_many`, all of the above but `read` as the service runs them;
               `decoder v1`: the same rows sent as schema_version 1 (upgrade + slow path)
  routing      sinks per record (`Config.sinks_for`, remembered per (tenant, entity_type)).
               The service asks once per batch and pair (`Pipeline._route`, inside
               `bookkeeping`), so counting this stage in the sum overstates routing
  bookkeeping  `Pipeline.deliver` around a sink that does nothing, in-memory stores
  pg rows      `PostgresSink.copy_rows`, a batch at a time: the rows `write()` sends by COPY
               (`row_of`, a test helper, cost ~8 µs: it keeps every `orjson.dumps` result
               alive, allocator work);  sqlite rows: `SQLiteSink.row_of`;
               `pg payload`: what `write()` sends instead when the compiled decoder wrote
               each record's row (`Record.copy_row`): the batch's one binary COPY buffer
               (asyncpg then encodes nothing, where `pg rows` leaves it every value to encode);
               0 on the Python decoder's records, which carry no row
  kafka read   confluent-kafka Messages (built in memory) -> a SourceBatch (`KafkaSource`'s
               per-message loop: offsets, timestamp, headers, tenant); `kafka decoder`:
               `decode_many` of what it yields (Kafka's records through the decoder)
  s3 read      1 MiB chunks of a JSON-lines object -> `RawRecord`s (`ItemSource`'s line
               reader and records, as S3 and SFTP run them)

Then two comparisons, each way taking turns (the same minutes of the machine for each):
  bodies       the compiled decoder's batch, each record's `body` read (as the Typesense and
               Neo4j sinks read it) and then freed: left out and rebuilt from the bytes on
               first read (`Decoder()`), or built at once (`Decoder(bodies=True)`, what the
               factory sets for routes with such sinks); and both without the read
  times        the decoder over the same rows with their occurred_at spelled as other
               writers spell RFC 3339 (7 fraction digits as .NET writes them, 9 with an offset
               as Go's RFC3339Nano, a lowercase `t`, a year before 1685), against the plain
               spelling; each record has its own time, so the times cache never answers

    uv run python bench/bench_cpu.py [--records 200000] [--repeat 3] [--profile]
        [--only bodies,times]   (only those comparisons, not the stages)

`--profile` also prints a cProfile of decoder + bookkeeping (top functions by own time).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import importlib
import io
import os
import platform
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import orjson  # noqa: E402
from bench_embedded import make_lines  # noqa: E402
from confluent_kafka import Message  # noqa: E402

from ingest.config import KafkaSourceConfig, S3SourceConfig, parse_config  # noqa: E402
from ingest.formats import LineReader  # noqa: E402
from ingest.metrics import Metrics  # noqa: E402
from ingest.pipeline.admission import Admission  # noqa: E402
from ingest.pipeline.breaker import CircuitBreaker  # noqa: E402
from ingest.pipeline.decode import Decoder  # noqa: E402
from ingest.pipeline.retry import RetryPolicy  # noqa: E402
from ingest.pipeline.worker import Pipeline, SinkLane  # noqa: E402
from ingest.records import RawRecord, Record, SinkResult  # noqa: E402
from ingest.sinks.postgres import PostgresSink, _copy_payload  # noqa: E402
from ingest.sinks.sqlite import SQLiteSink  # noqa: E402
from ingest.sources.kafka import KafkaSource, _Partition  # noqa: E402
from ingest.sources.objects import ItemRef  # noqa: E402
from ingest.sources.s3 import S3Source  # noqa: E402
from ingest.state.base import DroppedRow  # noqa: E402

TENANT = "acme-corp"
BATCH = 2000  # the inbox's default batch size


def v1_lines(lines: Sequence[bytes]) -> list[bytes]:
    """The same rows spelled as schema_version 1 (for the upgrade stage)."""
    out = []
    for line in lines:
        b = orjson.loads(line)
        out.append(
            orjson.dumps(
                {
                    "schema_version": 1,
                    "tenant": b["tenant_id"],
                    "type": b["entity_type"],
                    "id": b["entity_id"],
                    "rev": b["revision"],
                    "ts": 1735689600,
                    "data": b["attributes"],
                }
            )
        )
    return out


def read(blob: bytes) -> list[RawRecord]:
    reader = LineReader("jsonl", False)
    lines = [*reader.feed(blob), *reader.finish()]
    return [
        RawRecord(
            data=ln.data,
            tenant=TENANT,
            source="inbox",
            seq=i,
            position=ln.offset,
            event_time=0.0,
            decoded=ln.decoded,
        )
        for i, ln in enumerate(lines)
    ]


def kafka_source() -> KafkaSource:
    """A source that owns partition 0..5 of topic `t` without a broker: only `_to_batch` runs."""
    src = KafkaSource(KafkaSourceConfig(topics=["t"]))
    src._parts = {("t", p): _Partition(epoch=1) for p in range(6)}
    return src


def kafka_messages(lines: Sequence[bytes]) -> list[Message]:
    """The rows as the broker hands them over (6 partitions, a tenant-less message, as
    `bench_kafka.py` produces them)."""
    return [
        Message(
            topic="t",
            partition=i % 6,
            offset=i // 6,
            key=b"k%d" % i,
            value=ln,
            timestamp=(1, 1_735_689_600_000),
        )
        for i, ln in enumerate(lines)
    ]


def kafka_read(src: KafkaSource, msgs: list[Message]) -> list[RawRecord]:
    out: list[RawRecord] = []
    for i in range(0, len(msgs), BATCH):
        batch = src._to_batch(msgs[i : i + BATCH])
        assert batch is not None
        out += batch.records
    return out


def s3_read(blob: bytes) -> list[RawRecord]:
    """`ItemSource._lines` + `_records` over 1 MiB chunks of one object, in memory."""
    cfg = S3SourceConfig(url="s3://bench/in/", tenant=TENANT)
    src = S3Source(cfg, None, None, worker_id="w")  # type: ignore[arg-type]
    ref = ItemRef("in/rows.jsonl", "etag", len(blob), 0.0)

    async def chunks(ref: ItemRef, start: int) -> Any:
        for i in range(start, len(blob), 1 << 20):
            yield blob[i : i + (1 << 20)]

    src.open_item = chunks  # type: ignore[method-assign, assignment]

    async def go() -> list[RawRecord]:
        out: list[RawRecord] = []
        async for lines in src._lines(ref, 0):
            out += src._records(ref, lines)
        return out

    return asyncio.run(go())


class NullSink:
    """A sink that stores nothing: what is left of `deliver` is the pipeline's own work."""

    kind = "null"

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def health(self) -> dict[str, Any]:
        return {"connected": True}

    async def write(self, records: Sequence[Record]) -> list[SinkResult]:
        return [SinkResult.applied()] * len(records)


class MemoryIdempotency:
    def __init__(self) -> None:
        self.keys: set[bytes] = set()

    async def seen(self, keys: Sequence[bytes]) -> list[bool]:
        return [k in self.keys for k in keys]

    async def claim(self, keys: Sequence[bytes]) -> None:
        self.keys.update(keys)

    async def stats(self) -> dict[str, Any]:
        return {"keys": len(self.keys)}


class MemoryDLQ:
    async def add(self, entries: Sequence[Any]) -> None: ...

    async def record_processed(self, counts: Any) -> None: ...


class MemoryDropped:
    async def add(self, records: Sequence[DroppedRow]) -> None: ...


def pipeline() -> Pipeline:
    config = parse_config({"sinks": [{"type": "sqlite", "name": "sink"}]})
    lane = SinkLane(NullSink("sink"), CircuitBreaker("sink"))  # type: ignore[arg-type]
    return Pipeline(
        config=config,
        admission=Admission(config.admission, config.limits_for),
        idempotency=MemoryIdempotency(),
        dlq=MemoryDLQ(),  # type: ignore[arg-type]
        dropped=MemoryDropped(),  # type: ignore[arg-type]
        lanes={"sink": lane},
        metrics=Metrics(),
        retry=RetryPolicy(),
    )


def deliver_all(pipe: Pipeline, raws: list[RawRecord], decoded: list[Any]) -> None:
    async def go() -> None:
        for i in range(0, len(raws), BATCH):
            await pipe.deliver(raws[i : i + BATCH], decoded[i : i + BATCH])

    asyncio.run(go())


def best_us(fn: Callable[[], Any], n: int, repeat: int) -> float:
    """CPU time of this process (not wall time): other people's work on a shared machine
    slows the wall clock, much less the CPU seconds a stage needs."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best / n * 1e6


def alternated(fns: dict[str, Callable[[], Any]], n: int, repeat: int) -> dict[str, float]:
    """`best_us` of each function, the functions taking turns (a, b, a, b...): the same
    minutes of the shared machine for each."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t0)
    return {name: t / n * 1e6 for name, t in best.items()}


def bodies(raws: list[RawRecord], lines: Sequence[bytes], n: int, rep: int) -> None:
    """Decode + read every body + free, the body left out (rebuilt on read) or built at once."""
    lazy = Decoder()
    try:
        eager = Decoder(bodies=True)  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        print("bodies: this tree's decoder has no `bodies`")
        return
    if lazy.path != "compiled":
        print("bodies: the compiled decoder is not built")
        return

    def read_bodies(decoder: Decoder) -> None:
        for i in range(0, n, BATCH):
            for rec in decoder.decode_many(raws[i : i + BATCH]):
                rec.body  # type: ignore[union-attr]  # noqa: B018

    def no_read(decoder: Decoder) -> None:
        for i in range(0, n, BATCH):
            decoder.decode_many(raws[i : i + BATCH])

    got = alternated(
        {
            "lazy+read": lambda: read_bodies(lazy),
            "eager+read": lambda: read_bodies(eager),
            "lazy": lambda: no_read(lazy),
            "eager": lambda: no_read(eager),
        },
        n,
        rep,
    )
    print(
        "bodies, in turns, µs/record (decode, body read, freed): "
        + ", ".join(f"{k} {v:.2f}" for k, v in got.items())
    )


def odd_times(lines: Sequence[bytes]) -> list[bytes]:
    """The rows with occurred_at spelled four other ways RFC 3339 allows, in turn: 7 fraction
    digits (.NET's "o"), 9 and an offset (Go's RFC3339Nano), a lowercase `t`, a year 1600."""
    out = []
    for i, line in enumerate(lines):
        body = orjson.loads(line)
        when = body["occurred_at"]  # 2025-01-01T00:00:00.000Z
        plain, ms = when[:19], when[20:23]
        body["occurred_at"] = [
            f"{plain}.{ms}4567Z",
            f"{plain[:11]}{int(plain[11:13]) + 1:02d}{plain[13:]}.{ms}456789+01:00",
            f"{plain[:10]}t{plain[11:]}.{ms}Z",
            f"1600{plain[4:]}.{ms}Z",
        ][i % 4]
        out.append(orjson.dumps(body))
    return out


def times(raws: list[RawRecord], lines: Sequence[bytes], n: int, rep: int) -> None:
    """The decoder over plain and otherwise spelled times, and how many batches keep their
    facts (a time the compiled path cannot read sends its record to Python)."""
    decoder = Decoder()
    odd = [RawRecord(ln, TENANT, "inbox", i, i, 0.0) for i, ln in enumerate(odd_times(lines))]
    py = Decoder(native=False)
    for a, b in zip(decoder.decode_many(odd[:2000]), py.decode_many(odd[:2000]), strict=True):
        assert isinstance(a, Record) and isinstance(b, Record) and a.dedupe_key == b.dedupe_key

    def batches(feed: list[RawRecord]) -> int:
        kept = 0
        for i in range(0, n, BATCH):
            kept += decoder.decode_batch(feed[i : i + BATCH])[1] is not None
        return kept

    got = alternated({"plain": lambda: batches(raws), "odd": lambda: batches(odd)}, n, rep)
    total = -(-n // BATCH)
    print(
        f"times, in turns, µs/record (decode_batch): plain {got['plain']:.2f}, "
        f"odd {got['odd']:.2f}; batches with facts: plain {batches(raws)}/{total}, "
        f"odd {batches(odd)}/{total}"
    )


COMPARISONS: dict[str, Callable[[list[RawRecord], Sequence[bytes], int, int], None]] = {
    "bodies": bodies,
    "times": times,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated: bodies, times")
    args = ap.parse_args()
    n, rep = args.records, args.repeat
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, load average {os.getloadavg()}"
    )
    # the collector settings `ingest run` uses: in ingest.service since 85af5a8, in the CLI
    # before; older trees had none (default GC)
    tune: Callable[[], None] | None = None
    for module in ("ingest.service", "ingest.cli.ingest"):
        tune = getattr(importlib.import_module(module), "tune_gc", None)
        if tune is not None:
            break
    if tune is not None:
        tune()
        print("gc: as `ingest run` sets it (tune_gc)")
    else:
        print("gc: Python's defaults")
    lines = make_lines(n)
    blob = b"\n".join(lines) + b"\n"
    if args.only:
        for name in args.only.split(","):
            COMPARISONS[name](read(blob), lines, n, rep)
        print(f"load average after: {os.getloadavg()}")
        return
    old = v1_lines(lines)
    raws = read(blob)
    old_raws = [RawRecord(ln, TENANT, "inbox", i, i, 0.0) for i, ln in enumerate(old)]
    decoder = Decoder()
    py_decoder = Decoder(native=False)  # the pure-Python fast path, for the comparison
    print(f"decoder path: {decoder.path} (INGEST_NO_EXTENSION=1: python)")
    decoded = decoder.decode_many(raws)
    records = [r for r in decoded if isinstance(r, Record)]
    assert len(records) == n, "every bench row must decode"
    config = parse_config({"sinks": [{"type": "sqlite", "name": "sink"}]})
    fast = decoder._fast
    envs = [fast.decode(ln) for ln in lines]
    bodies = [r.body for r in records]
    keys = [r.dedupe_key for r in records]

    def validate() -> None:
        times: dict[str, float] = {}
        for env in envs:
            _ = env.tenant_id != TENANT
            if not fast.known_attributes.isdisjoint(env.attributes):
                fast.attributes_ok(env.attributes)
            if times.get(env.occurred_at) is None:
                times[env.occurred_at] = decoder._time_of(env.occurred_at)

    def key_of() -> None:
        for env in envs:
            body = {
                "attributes": env.attributes,
                "deleted": env.deleted,
                "entity_id": env.entity_id,
                "entity_type": env.entity_type,
                "occurred_at": env.occurred_at,
                "priority": env.priority,
                "relations": env.relations,
                "revision": env.revision,
                "schema_version": 3,
                "tenant_id": env.tenant_id,
            }
            hashlib.sha256(orjson.dumps(body, None, orjson.OPT_SORT_KEYS)).digest()

    def build() -> None:
        for env, body, key in zip(envs, bodies, keys, strict=True):
            t, e, i = env.tenant_id, env.entity_type, env.entity_id
            Record(raw, body, key, t, e, i, env.revision, (t, e, i), env.deleted, env.priority)

    raw = raws[0]
    pg = PostgresSink("pg", "postgresql://unused/")  # rows only: never started
    msgs = kafka_messages(lines)
    kafka_raws = kafka_read(kafka_source(), msgs)
    assert all(isinstance(r, Record) for r in decoder.decode_many(kafka_raws))
    assert len(s3_read(blob)) == n
    stages: list[tuple[str, Callable[[], Any]]] = [
        ("read", lambda: read(blob)),
        ("decode+check", lambda: [fast.decode(ln) for ln in lines]),
        ("validate", validate),
        ("dedupe key", key_of),
        ("record", build),
        ("decoder", lambda: decoder.decode_many(raws)),
        ("decoder v1", lambda: decoder.decode_many(old_raws)),
        ("routing", lambda: [config.sinks_for(r.tenant, r.entity_type) for r in records]),
        ("bookkeeping", lambda: deliver_all(pipeline(), raws, decoded)),
        ("pg rows", lambda: [pg.copy_rows(records[i : i + BATCH]) for i in range(0, n, BATCH)]),
        (
            "pg payload",
            lambda: [
                _copy_payload(records[i : i + BATCH])
                for i in range(0, n, BATCH)
                if records[i].copy_row is not None
            ],
        ),
        ("sqlite rows", lambda: [SQLiteSink.row_of(r, 0.0) for r in records]),
        ("kafka read", lambda: kafka_read(kafka_source(), msgs)),
        ("kafka decoder", lambda: decoder.decode_many(kafka_raws)),
        ("s3 read", lambda: s3_read(blob)),
    ]
    print(f"records: {n:,}, best of {rep}, CPU µs per record (GC on)")
    figures: dict[str, float] = {}
    for name, fn in stages:
        figures[name] = best_us(fn, n, rep)
        print(f"  {name:12s} {figures[name]:7.2f}")
    total = figures["read"] + figures["decoder"] + figures["routing"] + figures["bookkeeping"]
    print(f"  {'= pipeline':12s} {total:7.2f}  (read + decoder + routing + bookkeeping)")
    if decoder.path == "compiled":
        both = alternated(
            {
                "compiled": lambda: decoder.decode_many(raws),
                "python": lambda: py_decoder.decode_many(raws),
            },
            n,
            rep,
        )
        print(
            f"decoder, alternated in turns: compiled {both['compiled']:.2f}, "
            f"python {both['python']:.2f}, saved {both['python'] - both['compiled']:.2f} µs/record"
        )
        for compare in COMPARISONS.values():
            compare(raws, lines, n, rep)
    print(f"load average after: {os.getloadavg()}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        deliver_all(pipeline(), raws, decoder.decode_many(raws))
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
        print(out.getvalue())


if __name__ == "__main__":
    main()
