"""The inbox against hostile directories: symlinks, undecodable names, files that grow.

Real files in a temp directory and the real SQLite checkpoint store (no server). Each property
runs the source the way the runner does (read a batch, commit it, read on) until it goes idle.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.config import InboxSourceConfig
from ingest.names import valid_name
from ingest.sources import inbox as inbox_mod
from ingest.sources.base import SourceBatch
from ingest.sources.inbox import InboxPosition, InboxSource
from ingest.state.sqlite import SQLiteCheckpointStore, SQLiteDB

Hook = Callable[[SourceBatch], Awaitable[None] | None]


def rec(tenant: str, i: int, tag: str = "r") -> bytes:
    return orjson.dumps({"tenant_id": tenant, "entity_id": f"{tag}-{i}", "n": i}) + b"\n"


def records(tenant: str, n: int, tag: str = "r", start: int = 0) -> bytes:
    return b"".join(rec(tenant, i, tag) for i in range(start, n))


class Harness:
    def __init__(self, root: Path, db: SQLiteDB, **kw: Any) -> None:
        batch = kw.pop("batch", 5)
        cfg = InboxSourceConfig(path=root / "inbox", poll_seconds=0.01, batch_size=batch)
        self.inbox = root / "inbox"
        self.checkpoints = SQLiteCheckpointStore(db, "test")
        self.source = InboxSource(cfg, self.checkpoints, settle_seconds=0, **kw)
        self.batches: list[SourceBatch] = []

    async def run(self, before_commit: Hook | None = None) -> list[bytes]:
        """Read and commit, as the runner does, until the source sits idle; the records."""
        await self.source.start()
        out: list[bytes] = []

        async def pump() -> None:
            async for batch in self.source.batches():
                self.batches.append(batch)
                out.extend(r.data for r in batch.records)
                if before_commit is not None:
                    result = before_commit(batch)
                    if result is not None:
                        await result
                await self.source.commit(batch)
                orjson.dumps(self.source.health().as_dict())  # always JSON

        task = asyncio.create_task(pump())
        quiet, seen = 0, -1
        while quiet < 5 and not task.done():
            await asyncio.sleep(0.02)
            idle = self.source.health().status == "idle" and len(self.batches) == seen
            quiet = quiet + 1 if idle else 0
            seen = len(self.batches)
        await self.source.stop()
        await asyncio.wait_for(task, 10)
        return out


async def with_harness(fn: Callable[[Harness], Awaitable[None]], **kw: Any) -> None:
    root = Path(tempfile.mkdtemp(prefix="inbox-hostile-"))
    db = await SQLiteDB.open(root / "state.db")
    try:
        await fn(Harness(root, db, **kw))
    finally:
        await db.close()
        shutil.rmtree(root, ignore_errors=True)


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under path (None for directories), symlinks not followed."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), path)] = None
        for f in filenames:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, path)] = (
                b"->" + os.fsencode(os.readlink(full))
                if os.path.islink(full)
                else Path(full).read_bytes()
            )
    return out


# ------------------------------------------------------------------------------ symlinks

_LINKS = st.sets(
    st.sampled_from(["tenant_dir", "file", "done_dir", "quarantine_dir", "dangling", "to_dir"]),
    min_size=1,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(links=_LINKS, n=st.integers(1, 12))
def test_symlinks_are_never_followed(links: set[str], n: int) -> None:
    async def go(h: Harness) -> None:
        outside = h.inbox.parent / "outside"
        (outside / "dir").mkdir(parents=True)
        (outside / "secret.jsonl").write_bytes(records("acme", 3, "secret"))
        (outside / "dir" / "x.jsonl").write_bytes(records("acme", 3, "secret-dir"))
        tenant = h.inbox / "acme"
        tenant.mkdir(parents=True)
        (tenant / "real.jsonl").write_bytes(records("acme", n))
        if "tenant_dir" in links:
            (h.inbox / "linked").symlink_to(outside / "dir")
        if "file" in links:
            (tenant / "passwd.jsonl").symlink_to(outside / "secret.jsonl")
        if "dangling" in links:
            (tenant / "gone.jsonl").symlink_to(outside / "nothing.jsonl")
        if "to_dir" in links:
            (tenant / "d.jsonl").symlink_to(outside / "dir")
        if "done_dir" in links:
            (tenant / "done").symlink_to(outside / "dir")
        if "quarantine_dir" in links:
            bad = os.path.join(os.fsencode(tenant), b"\xff.jsonl")
            Path(os.fsdecode(bad)).write_bytes(records("acme", 1, "bad"))
            (tenant / "quarantine").symlink_to(outside / "dir")
        before = tree(outside)
        got = await h.run()
        assert tree(outside) == before  # nothing outside read into, created in or moved
        assert not any(b"secret" in line for line in got)
        assert sorted(got) == sorted(records("acme", n).splitlines())
        errors = " ".join(h.source.health().errors)
        if links & {"file", "dangling", "to_dir", "tenant_dir"}:
            assert "symlink" in errors
        if "done_dir" in links:
            assert (tenant / "real.jsonl").exists()  # not moved through the link
            assert "symlink" in errors
        else:
            assert (tenant / "done" / "real.jsonl").exists()

    asyncio.run(with_harness(go))


# ------------------------------------------------------------------------------ names

_NAME_BYTES = st.binary(min_size=1, max_size=40).map(
    lambda b: b.replace(b"/", b"_").replace(b"\0", b"_").lstrip(b".") or b"x"
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(_NAME_BYTES, min_size=1, max_size=5, unique=True),
    tenant_names=st.lists(_NAME_BYTES, max_size=3, unique=True),
)
def test_any_file_or_tenant_name_never_stops_the_source(
    names: list[bytes], tenant_names: list[bytes]
) -> None:
    """Arbitrary bytes as names: UTF-8 ones are read, the rest quarantined with a health
    error; checkpoints and the health document stay JSON; nothing is read twice."""

    async def go(h: Harness) -> None:
        tenant = h.inbox / "acme"
        tenant.mkdir(parents=True)
        expected: list[bytes] = []
        quarantined = []
        for i, raw in enumerate(names):
            name = raw + b".jsonl"
            if name.endswith((b".tmp.jsonl",)) or name in (b"done.jsonl",):
                continue
            body = records("acme", 2, f"f{i}")
            (Path(os.fsdecode(os.path.join(os.fsencode(tenant), name)))).write_bytes(body)
            try:
                name.decode("utf-8")
            except UnicodeDecodeError:
                quarantined.append(name)
            else:
                expected += body.splitlines()
        for raw in tenant_names:
            if raw == b"acme":
                continue
            d = Path(os.fsdecode(os.path.join(os.fsencode(h.inbox), raw)))
            d.mkdir()
            (d / "x.jsonl").write_bytes(records("acme", 1, "other-tenant"))
            if valid_name(d.name):
                expected += records("acme", 1, "other-tenant").splitlines()
        got = await h.run()
        assert sorted(got) == sorted(expected)
        health = h.source.health().as_dict()
        orjson.dumps(health)
        assert health["files_quarantined"] == len(quarantined)
        for name in quarantined:
            assert os.path.exists(os.path.join(os.fsencode(tenant), b"quarantine", name))
        text = " ".join(health["errors"])
        if quarantined:
            assert "not UTF-8" in text and "quarantine" in text
        for raw in tenant_names:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                assert "tenant directory name is not UTF-8" in text
        for cp in (await h.checkpoints.list()).values():
            orjson.dumps(cp)

    asyncio.run(with_harness(go))


# ------------------------------------------------------------------------------ growth


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=st.integers(1, 7),
    appends=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    fmt=st.sampled_from(["jsonl", "jsonl.gz", "csv"]),
    batch=st.integers(1, 6),
)
def test_growth_after_pickup_is_read_not_lost(
    first: int, appends: list[int], fmt: str, batch: int
) -> None:
    """Records appended through a descriptor held open, after the reader reached the end:
    every one is read exactly once, and the file is moved only when nothing is left."""

    def encode(start: int, n: int, header: bool) -> bytes:
        if fmt == "csv":
            head = b"tenant_id,entity_id\n" if header else b""
            return head + b"".join(b"acme,e-%d\n" % i for i in range(start, start + n))
        body = records("acme", start + n, "e", start)
        return gzip.compress(body) if fmt == "jsonl.gz" else body

    async def go(h: Harness) -> None:
        tenant = h.inbox / "acme"
        tenant.mkdir(parents=True)
        path = tenant / f"grow.{fmt}"
        fh = path.open("ab")
        fh.write(encode(0, first, True))
        fh.flush()
        todo = list(appends)
        total = first

        def grow(b: SourceBatch) -> None:
            nonlocal total
            pos: InboxPosition = b.position
            if pos.last and todo:
                n = todo.pop(0)
                fh.write(encode(total, n, False))
                fh.flush()
                total += n

        try:
            got = await h.run(before_commit=grow)
        finally:
            fh.close()
        if fmt == "csv":
            ids = sorted(line.split(b",")[1] for line in got)
            assert ids == sorted(b"e-%d" % i for i in range(total))
        else:
            ids = sorted(orjson.loads(line)["entity_id"] for line in got)
            assert ids == sorted(f"e-{i}" for i in range(total))
        assert (tenant / "done" / path.name).exists() and not path.exists()

    asyncio.run(with_harness(go, batch=batch))


def test_growth_during_the_move_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go(h: Harness) -> None:
        tenant = h.inbox / "acme"
        tenant.mkdir(parents=True)
        path = tenant / "late.jsonl"
        path.write_bytes(records("acme", 2))
        fh = path.open("ab")
        real_rename = os.rename

        def rename(*args: Any, **kw: Any) -> None:
            fh.write(rec("acme", 99))  # the writer gets in just before the move
            fh.flush()
            real_rename(*args, **kw)

        monkeypatch.setattr(inbox_mod.os, "rename", rename)
        try:
            await h.run()
        finally:
            fh.close()
            monkeypatch.undo()
        errors = " ".join(h.source.health().errors)
        assert "grew by" in errors and "were not read" in errors

    asyncio.run(with_harness(go))


def test_rewritten_smaller_or_replaced_file_is_read_again() -> None:
    async def go(h: Harness) -> None:
        tenant = h.inbox / "acme"
        tenant.mkdir(parents=True)
        path = tenant / "x.jsonl"
        path.write_bytes(records("acme", 6, "old"))
        seen: list[str] = []

        def rewrite(b: SourceBatch) -> None:
            if b.position.last and not seen:
                seen.append("done")
                with path.open("r+b") as fh:  # same inode, smaller, new content
                    fh.truncate(0)
                    fh.write(records("acme", 2, "new"))

        got = await h.run(before_commit=rewrite)
        assert sorted(got) == sorted(
            records("acme", 6, "old").splitlines() + records("acme", 2, "new").splitlines()
        )
        assert "shrank" in " ".join(h.source.health().errors)
        assert (tenant / "done" / "x.jsonl").read_bytes() == records("acme", 2, "new")

    asyncio.run(with_harness(go))


# ------------------------------------------------------------------------------ fairness


def test_a_huge_line_does_not_hold_up_other_tenants() -> None:
    """Tenants take turns inside a long line: `small` is read before `big` finishes."""

    async def go(h: Harness) -> None:
        (h.inbox / "big").mkdir(parents=True)
        (h.inbox / "small").mkdir(parents=True)
        with (h.inbox / "big" / "a.jsonl").open("wb") as fh:
            for _ in range(40):
                fh.write(b"x" * (1 << 20))
            fh.write(b"\n" + records("big", 1))
        (h.inbox / "small" / "b.jsonl").write_bytes(records("small", 3))
        got = await h.run()
        order = [b.position.tenant for b in h.batches if b.records]
        assert order.index("small") < order.index("big")
        big = [r for b in h.batches for r in b.records if r.tenant == "big"]
        reject = big[0].meta["reject"]
        assert reject["kind"] == "size" and reject["size"] == 40 << 20
        assert reject["limit"] == 1 << 20 and reject["file"] == "a.jsonl"
        assert len(big[0].data) == 1024
        assert len(got) == 5

    asyncio.run(with_harness(go, batch=2000))


# ------------------------------------------------------------------ unreadable files

_ERRNOS = st.sampled_from([errno.EACCES, errno.EPERM, errno.EIO, errno.ENXIO, errno.ELOOP])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ERRNOS, st.sampled_from(["open", "read"]))
def test_a_file_that_cannot_be_opened_or_read_does_not_spin_the_loop(
    err: int, where: str
) -> None:
    """Found as a non-root service with a `chmod 000` file in the inbox: the failed open ended
    the file's reader, the source rescanned at once, found the same file ready, and so on
    without ever awaiting: 100 % CPU, /health/live and every other tenant starved. Now the
    file waits UNREADABLE_RETRY_SECONDS; the others are read; health names it."""
    attempts = 0
    real_open, real_take = inbox_mod._open_file, inbox_mod._FileLines.take

    def broken(name: str) -> None:
        nonlocal attempts
        if name == "bad.jsonl":
            attempts += 1
            if attempts > 50:  # the spin: stop it here or the test would hang, not fail
                raise RuntimeError(f"{attempts} attempts on an unreadable file")
            raise OSError(err, os.strerror(err))

    def open_file(tenant_dir: Path, name: str) -> Any:
        if where == "open":
            broken(name)
        return real_open(tenant_dir, name)

    real_init = inbox_mod._FileLines.__init__

    def init(self: Any, fh: Any, name: str, *args: Any) -> None:
        real_init(self, fh, name, *args)
        self.test_name = name

    def take(self: Any, n: int, budget: int) -> Any:
        if where == "read":
            broken(self.test_name)
        return real_take(self, n, budget)

    async def go(h: Harness) -> None:
        for tenant in ("acme", "other"):
            (h.inbox / tenant).mkdir(parents=True)
        (h.inbox / "acme" / "bad.jsonl").write_bytes(records("acme", 3))
        (h.inbox / "acme" / "good.jsonl").write_bytes(records("acme", 3, "g"))
        (h.inbox / "other" / "x.jsonl").write_bytes(records("other", 4))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        try:
            out = await h.run()
        finally:
            t.cancel()
        assert len(out) == 7  # the readable files of both tenants
        assert attempts <= 2, attempts
        assert ticks >= 5  # the loop kept turning
        assert "bad.jsonl" in " ".join(h.source.health().errors)
        assert (h.inbox / "acme" / "bad.jsonl").exists()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inbox_mod, "_open_file", open_file)
        mp.setattr(inbox_mod._FileLines, "__init__", init)
        mp.setattr(inbox_mod._FileLines, "take", take)
        asyncio.run(with_harness(go))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 20), st.integers(1, 20))
def test_growth_after_the_move_to_done_is_reported(first: int, later: int) -> None:
    """Found with a writer that wrote 10 lines, paused 1.5 s (longer than the settle window),
    wrote 10 more, and so on: the file was read, moved to done/ and its writer went on writing
    into the moved file: 50 of 60 records unread and not a word said. The moved file is now
    watched; its growth is a health error naming it and what to do."""

    async def go(h: Harness) -> None:
        tenant = h.inbox / "acme"
        tenant.mkdir(parents=True)
        path = tenant / "slow.jsonl"
        fh = path.open("ab")  # the writer keeps its file open
        fh.write(records("acme", first))
        fh.flush()
        await h.source.start()
        read: list[bytes] = []

        async def pump() -> None:
            async for batch in h.source.batches():
                read.extend(r.data for r in batch.records)
                await h.source.commit(batch)

        task = asyncio.create_task(pump())
        try:
            for _ in range(500):
                if (tenant / "done" / "slow.jsonl").exists():
                    break
                await asyncio.sleep(0.02)
            assert (tenant / "done" / "slow.jsonl").exists()
            fh.write(records("acme", first + later, start=first))  # into the moved file
            fh.flush()
            for _ in range(500):
                if any("grew by" in e for e in h.source.health().errors):
                    break
                await asyncio.sleep(0.02)
            errors = " ".join(h.source.health().errors)
            assert "done/slow.jsonl grew by" in errors and "not read" in errors, errors
            assert len(read) == first
        finally:
            fh.close()
            await h.source.stop()
            await asyncio.wait_for(task, 10)

    asyncio.run(with_harness(go))


# ------------------------------------------------------------------------------ no settle wait


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 30), torn=st.booleans())
def test_a_file_closed_by_its_writer_is_taken_without_the_settle_wait(n: int, torn: bool) -> None:
    """With a settle window far longer than the test: a file some process still holds open
    for writing, or one that ends inside a line, is not taken; once its writer closed it
    with whole lines it is taken at the next scan."""

    async def go() -> None:
        root = Path(tempfile.mkdtemp(prefix="inbox-nowriter-"))
        db = await SQLiteDB.open(root / "state.db")
        try:
            cfg = InboxSourceConfig(path=root / "inbox", poll_seconds=0.01, batch_size=1000)
            source = InboxSource(cfg, SQLiteCheckpointStore(db, "t"), settle_seconds=3600)
            tenant = root / "inbox" / "acme"
            tenant.mkdir(parents=True)
            body = records("acme", n)
            fh = (tenant / "a.jsonl").open("wb")
            fh.write(body)
            fh.flush()
            assert source._ready_files("acme") == []  # open for writing
            if torn:
                fh.write(b'{"tenant_id": "acme", "entity_id": "half')
            fh.close()
            ready = [name for name, _ in source._ready_files("acme")]
            assert ready == ([] if torn else ["a.jsonl"])
        finally:
            await db.close()
            shutil.rmtree(root, ignore_errors=True)

    asyncio.run(go())
