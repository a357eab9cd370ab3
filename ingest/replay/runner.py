"""Running a plan: which sources it names, how big it is, and replaying them through the Core.

Why replay never disturbs live progress: object sources are read with `list_window` and
`read_records` (no leases, no checkpoints); Kafka is read by a consumer group of its own
(`ingest-replay-<plan-id>`); brownout drops are read from the dropped store and deleted only
after `Pipeline.deliver` made them durable. Records go through the normal decode -> deliver
with `check_duplicates=False`: a replay is meant to re-apply, and the sinks' revision guard
judges an equal revision UNCHANGED, so repeating a batch after a kill has no second effect.
Progress is written into the plan after every batch; a rerun continues from there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ingest import config as C
from ingest.errors import StoreUnavailable
from ingest.factory import SOURCES, Core, Stores, lease_store, worker_id
from ingest.factory import object_source as build_object_source
from ingest.pipeline.admission import TokenBucket
from ingest.records import RawRecord
from ingest.replay import plans as P
from ingest.sources.objects import ItemRef, ItemSource, SourceFailure

DROPPED = "inbox-dropped"
OBJECT_KINDS = tuple(kind for kind, entry in SOURCES.items() if entry.replay == "objects")
REPLAYABLE = (*OBJECT_KINDS, *(kind for kind, entry in SOURCES.items() if entry.replay == "kafka"))
KINDS = (*REPLAYABLE, DROPPED)
MAX_BATCH = 500
KAFKA_IDLE_SECONDS = 5.0


class UnknownSource(Exception):
    """`--sources` named something the config does not have; the message lists what it has."""


# ------------------------------------------------------------------ resolving and estimating


def _configured(cfg: C.Config) -> dict[str, str]:
    """Replayable configured sources: name -> kind."""
    return {s.name: s.type for s in cfg.sources if s.type in REPLAYABLE}


def resolve_sources(cfg: C.Config, tenant: str, tokens: Sequence[str]) -> list[P.PlanSource]:
    """Kinds expand to every configured source of that kind serving the tenant; names as is."""
    known = _configured(cfg)
    # what this config can replay for this tenant: listing every kind told an embedded
    # operator "no s3 source ... (valid sources: s3, sftp, kafka, inbox-dropped)"
    serving = sorted(n for n in known if _serves(cfg, n, tenant))
    kinds = [k for k in REPLAYABLE if any(known[n] == k for n in serving)]
    valid = ", ".join([*kinds, DROPPED, *serving])
    out: dict[str, P.PlanSource] = {}
    for token in (t.strip() for t in tokens):
        if not token:
            continue
        if token == DROPPED:
            out[DROPPED] = P.PlanSource(DROPPED, DROPPED)
        elif token in known:
            out[token] = P.PlanSource(token, known[token])
        elif token in REPLAYABLE:
            names = [n for n, k in known.items() if k == token and _serves(cfg, n, tenant)]
            if not names:
                raise UnknownSource(
                    f"no {token} source for tenant '{tenant}' in the config "
                    f"(valid sources: {valid})"
                )
            out.update({n: P.PlanSource(n, token) for n in names})
        else:
            raise UnknownSource(f"unknown source '{token}' (valid sources: {valid})")
    if not out:
        raise UnknownSource(f"no sources given (valid sources: {valid})")
    return list(out.values())


def _serves(cfg: C.Config, name: str, tenant: str) -> bool:
    sc = _source_config(cfg, name)
    return getattr(sc, "tenant", None) in (None, tenant)


def _source_config(cfg: C.Config, name: str) -> Any:
    return next(s for s in cfg.sources if s.name == name)


def object_source(cfg: C.Config, name: str, stores: Stores) -> ItemSource[Any]:
    """An S3/SFTP source for listing and reading only: the lease store is never touched."""
    sc = _source_config(cfg, name)
    return build_object_source(
        sc, stores, lease_store(stores), f"replay-{worker_id()}", cfg.http.max_record_bytes
    )


async def _window(src: ItemSource[Any], start: float, end: float) -> list[ItemRef]:
    lister: Any = getattr(src, "list_window", src.window)
    refs: list[ItemRef] = await lister(start, end)
    return refs


async def estimate(cfg: C.Config, stores: Stores, plan: P.Plan) -> None:
    """Fill each source's estimate where it is cheap; Kafka stays unknown unless the source
    can count offsets for a time window."""
    for ps in plan.sources:
        if ps.kind == DROPPED:
            ps.estimate_records = await _dropped_in_window(stores, plan)
            ps.note = "brownout drops in the window"
        elif ps.kind in OBJECT_KINDS:
            src = object_source(cfg, ps.name, stores)
            try:
                refs = await _window(src, plan.start, plan.end)
            except Exception as exc:
                ps.note = f"could not list: {src.describe(exc).message}"
                continue
            finally:
                await src.close_client()
            ps.estimate_objects = len(refs)
            ps.estimate_bytes = sum(r.size for r in refs)
            ps.note = "objects and bytes in the window; records unknown"
            if not refs:
                ps.estimate_records = 0
        else:
            ps.note = "unknown: the Kafka source cannot count offsets for a time window"


async def _dropped_in_window(stores: Stores, plan: P.Plan) -> int:
    n = 0
    async for page in stores.dropped.scan(plan.tenant, 1000):
        n += sum(1 for row in page if plan.start <= row[4] < plan.end)
    return n


# ------------------------------------------------------------------------- legal holds


@dataclass(slots=True)
class HoldCheck:
    blocked: bool
    note: str


async def check_legal_hold(url: str | None, tenant: str) -> HoldCheck:
    """GET $URL/holds?tenant=T. Any hold listed as active blocks; an unreachable service
    raises (the caller refuses to run: a hold must not be skipped because its service is down).
    """
    if not url:
        return HoldCheck(False, "no legal-hold service configured")
    import httpx

    async with httpx.AsyncClient(timeout=5.0) as client:
        resp = await client.get(f"{url.rstrip('/')}/holds", params={"tenant": tenant})
        resp.raise_for_status()
        body = resp.json()
    holds = body.get("holds", []) if isinstance(body, dict) else body
    active = [h for h in holds if isinstance(h, dict) and _active(h, tenant)]
    if not active:
        return HoldCheck(False, f"no active legal hold for {tenant} at {url}")
    ids = ", ".join(str(h.get("id") or h.get("reason") or "hold") for h in active)
    return HoldCheck(True, f"active legal hold for tenant {tenant}: {ids}")


def _active(hold: dict[str, Any], tenant: str) -> bool:
    if hold.get("tenant", tenant) != tenant:
        return False
    if "active" in hold:
        return bool(hold["active"])
    return str(hold.get("status", "active")).lower() == "active"


# ------------------------------------------------------------------------------- the run


OnBatch = Callable[[int], None]


class Replay:
    """One run of a plan: sources in order, progress saved after each batch."""

    def __init__(
        self,
        core: Core,
        plan: P.Plan,
        store: P.PlanStore,
        *,
        on_batch: OnBatch = lambda n: None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.core, self.plan, self.store = core, plan, store
        self.on_batch, self.should_stop = on_batch, should_stop
        rate = max(plan.throttle, 0.001)
        self.bucket = TokenBucket(rate, max(rate, 1.0))
        self.batch_size = max(1, min(MAX_BATCH, int(self.bucket.burst)))
        self._seq = 0

    async def run(self) -> bool:
        """True when every source is done; False when stopped early (progress saved)."""
        for ps in self.plan.sources:
            prog = self.plan.progress.setdefault(ps.name, P.Progress())
            if prog.done:
                continue
            if ps.kind == DROPPED:
                await self._dropped(prog)
            elif ps.kind in OBJECT_KINDS:
                await self._objects(ps, prog)
            else:
                await self._kafka(ps, prog)
            if self.should_stop():
                return False
            prog.done = True
            await self.store.save(self.plan)
        return True

    async def _deliver(self, raws: list[RawRecord], prog: P.Progress) -> None:
        """Throttle, decode, deliver; counts into `prog` (saved by the caller)."""
        n = len(raws)
        while not self.bucket.try_take(n):
            await asyncio.sleep(self.bucket.wait_time(n))
        decoded = self.core.decoder.decode_many(raws)
        report = await self.core.pipeline.deliver(
            raws, decoded, check_duplicates=False, count_processed=False
        )
        prog.read += n
        prog.delivered += report.delivered
        prog.duplicate += report.duplicate
        prog.dlq += report.dlq
        self.on_batch(n)

    def _chunks(self, raws: list[RawRecord]) -> list[list[RawRecord]]:
        size = self.batch_size
        return [raws[i : i + size] for i in range(0, len(raws), size)]

    # -- brownout drops ------------------------------------------------------------------

    async def _dropped(self, prog: P.Progress) -> None:
        plan, dropped = self.plan, self.core.stores.dropped
        while not self.should_stop():
            page: list[tuple[bytes, RawRecord]] = []
            async for rows in dropped.scan(plan.tenant, self.batch_size):
                for key, tenant, source, payload, at in rows:
                    if plan.start <= at < plan.end:
                        self._seq += 1
                        raw = RawRecord(
                            payload, tenant, source, self._seq, None, at, None, {"replay": plan.id}
                        )
                        page.append((key, raw))
                if len(page) >= self.batch_size:
                    break
            if not page:
                return
            page = page[: self.batch_size]
            await self._deliver([r for _, r in page], prog)
            await dropped.delete([k for k, _ in page])  # durable in sinks or the DLQ now
            await self.store.save(plan)

    # -- S3 / SFTP -----------------------------------------------------------------------

    async def _objects(self, ps: P.PlanSource, prog: P.Progress) -> None:
        src = object_source(self.core.config, ps.name, self.core.stores)
        try:
            refs = await _window(src, self.plan.start, self.plan.end)
            for ref in refs:
                item = f"{ref.name}#{ref.version}"
                if item in prog.items_done:
                    continue
                start = prog.current_offset if prog.current_item == item else 0
                prog.current_item, prog.current_offset = item, start
                async for raws in src.read_records(ref, start):
                    for chunk in self._chunks(raws):
                        await self._deliver(chunk, prog)
                        prog.current_offset = int(chunk[-1].position["offset"])
                        await self.store.save(self.plan)
                        if self.should_stop():
                            return
                prog.items_done.append(item)
                prog.current_item, prog.current_offset = None, 0
                await self.store.save(self.plan)
        except (StoreUnavailable, P.PlanError, SourceFailure):
            raise
        except Exception as exc:  # the bucket or server, put in words (unreachable: exit 3)
            raise src.describe(exc) from exc
        finally:
            await src.close_client()

    # -- Kafka ---------------------------------------------------------------------------

    async def _kafka(self, ps: P.PlanSource, prog: P.Progress) -> None:
        from ingest.sources.kafka import KafkaSource

        if not hasattr(KafkaSource, "seek_to_time"):
            raise RuntimeError("this build's Kafka source cannot seek to a time: no Kafka replay")
        sc = _source_config(self.core.config, ps.name)
        group = f"ingest-replay-{self.plan.id}"
        src = KafkaSource(
            sc.model_copy(update={"group_id": group}),
            max_record_bytes=self.core.config.http.max_record_bytes,
        )
        await src.start()
        partitions: set[tuple[str, int]] = set()
        past_end: set[tuple[str, int]] = set()
        batches = src.batches()
        try:
            while not self.should_stop():
                try:
                    batch = await asyncio.wait_for(anext(batches), KAFKA_IDLE_SECONDS)
                except (TimeoutError, StopAsyncIteration):
                    return  # idle: nothing more in the window
                if not prog.positioned:  # first batch came from the group's reset position
                    partitions = set(await src.seek_to_time(self.plan.start))
                    prog.positioned = True
                    await self.store.save(self.plan)
                    continue
                keep: list[RawRecord] = []
                for raw in batch.records:
                    topic, part, offset = raw.position
                    partitions.add((topic, part))
                    prog.offsets[f"{topic}:{part}"] = offset + 1
                    if raw.event_time >= self.plan.end:
                        past_end.add((topic, part))
                    if (
                        self.plan.start <= raw.event_time < self.plan.end
                        and raw.tenant == self.plan.tenant
                    ):
                        keep.append(raw)
                    else:
                        prog.skipped += 1
                for chunk in self._chunks(keep):
                    await self._deliver(chunk, prog)
                await src.commit(batch)
                await self.store.save(self.plan)
                if partitions and partitions <= past_end:
                    return
        finally:
            closer = getattr(batches, "aclose", None)
            if closer is not None:
                await closer()
            await src.close()


async def run(
    core: Core,
    plan: P.Plan,
    store: P.PlanStore,
    *,
    on_batch: OnBatch,
    should_stop: Callable[[], bool],
) -> bool:
    """Start (or resume) the plan, replay, and leave it completed, interrupted or failed."""
    P.start(plan, time.time())
    await store.save(plan)
    try:
        done = await Replay(core, plan, store, on_batch=on_batch, should_stop=should_stop).run()
    except Exception as exc:
        P.fail(plan, f"{type(exc).__name__}: {exc}")
        await store.save(plan)
        raise
    if done:
        P.finish(plan, time.time())
    else:
        P.interrupt(plan)
    await store.save(plan)
    return done
