"""The SQLite idempotency store probes a key its filter may hold only in the runs that its
filter's log rows went to (`_Bloom.rows`, `_runs_of`), not in every run: a wrong choice of
runs would answer "never claimed" for a claimed key (a record delivered twice)."""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.state.sqlite import SQLiteDB
from ingest.state.sqlite_idem import LOG_KEEP, KeyFilter, SQLiteIdempotencyStore, _Bloom, _runs_of

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _digest(i: int) -> bytes:
    return hashlib.sha256(b"r%d" % i).digest()


def test_runs_of_a_filter_are_the_runs_its_rows_went_to() -> None:
    """Run L holds the log rows after the run before it through L: a filter of rows 8..12
    may hold keys of runs 10 and 15 (rows 11..15), not of runs 5 or 20; the oldest live run's
    rows reach back to the start (the run before it is gone); a day table of the old layout
    and a filter built from the tables (None) ask every run."""
    live = ["idem_20261203_20", "idem_20261203_15", "idem_20261203_10", "idem_20261203_5"]
    assert _runs_of(live, [(8, 12)]) == ("idem_20261203_15", "idem_20261203_10")
    assert _runs_of(live, [(16, 16)]) == ("idem_20261203_20",)
    assert _runs_of(live, [(21, 30)]) == ()  # rows still in `idem_mid` or the log
    assert _runs_of(live, [(1, 2)]) == ("idem_20261203_5",)
    assert _runs_of(live, [(1, 2), (16, 18)]) == ("idem_20261203_20", "idem_20261203_5")
    assert _runs_of(live, [(8, 12), None]) == tuple(live)
    assert _runs_of(["idem_20261203_9", "idem_20261202"], [(10, 10)]) == ("idem_20261202",)


def test_a_filter_keeps_the_rows_it_holds() -> None:
    """Rows added in id order: first and last; a key read from the tables makes it any."""
    flt = KeyFilter()
    flt.add(_digest(1), T0, 7)
    flt.add(_digest(2), T0, 9)
    assert flt.maybe_rows(_digest(2) + _digest(1)) == [((7, 9), [0, 1])]
    flt.add(_digest(3), T0)
    assert flt.maybe_rows(_digest(3)) == [(None, [0])]


_step = st.one_of(
    st.tuples(st.just("claim"), st.integers(0, 1), st.sets(st.integers(0, 30), max_size=4)),
    st.tuples(st.just("wait"), st.just(0), st.floats(min_value=0, max_value=2 * LOG_KEEP)),
    st.tuples(st.just("restart"), st.integers(0, 1), st.none()),
)


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(_step, min_size=1, max_size=25),
    filter_keys=st.sampled_from([1, 3, 5]),
    mid_keys=st.sampled_from([1, 2, 4]),
    slice_keys=st.sampled_from([1, 3]),
)
def test_idempotency_property_small_filters_many_runs(
    steps: list[tuple[str, int, Any]], filter_keys: int, mid_keys: int, slice_keys: int
) -> None:
    """Two processes on one file, each filter holding a few keys (so each holds a few log
    rows) and `idem_mid` becoming a run every few keys (so a key's run is one of many),
    restarts (a filter built from the tables) and time past the log's keep (rows pruned):
    after every step both see a key exactly while its latest claim is younger than the TTL."""
    ttl = int(3 * LOG_KEEP)

    async def check() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            clock = FakeClock()
            dbs = [await SQLiteDB.open(Path(tmp) / "s.db") for _ in range(2)]

            def new_store(i: int) -> SQLiteIdempotencyStore:
                return SQLiteIdempotencyStore(
                    dbs[i],
                    ttl_seconds=ttl,
                    clock=clock,
                    recent_keys=1,
                    mid_keys=mid_keys,
                    slice_keys=slice_keys,
                )

            stores = [new_store(0), new_store(1)]
            everything = [_digest(i) for i in range(31)]
            latest: dict[bytes, float] = {}
            try:
                for what, who, arg in steps:
                    if what == "claim" and arg:
                        keys = [everything[i] for i in sorted(arg)]
                        await stores[who].claim(keys)
                        latest.update((k, clock.now) for k in keys)
                    elif what == "wait":
                        clock.now += arg
                    elif what == "restart":
                        stores[who] = new_store(who)
                    expect = [k in latest and clock.now - latest[k] < ttl for k in everything]
                    for store in stores:
                        assert await store.seen(everything) == expect
            finally:
                for d in dbs:
                    await d.close()

    with mock.patch.object(_Bloom, "KEYS", filter_keys):
        asyncio.run(check())
