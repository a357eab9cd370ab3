"""The SQLite idempotency store probes a key its filter may hold only in the runs that its
filter's log rows went to (`_Bloom.rows`, `_runs_of`), not in every run: a wrong choice of
runs would answer "never claimed" for a claimed key (a record delivered twice). The store's
property with many small filters and many runs: tests/integration/test_sqlite_state.py."""

from __future__ import annotations

import hashlib

from ingest.state.sqlite_idem import KeyFilter, _runs_of

T0 = 1_700_000_000.0


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


def test_runs_of_tables_of_slices_by_their_neighbours_firsts() -> None:
    """A table of slices `idem_sYYYYMMDD_F` holds the log rows after the table of slices
    before it (its F: that table's own slices were merged from it on) and before the next
    one's F (merges append only to the newest table): a filter is asked in every table that
    range meets, the newest's reaching on to the log's end; the runs of older code keep
    their exact ranges beside them."""
    a, b, c = "idem_s20261203_10", "idem_s20261203_26", "idem_s20261204_42"
    live = [c, b, a]
    assert _runs_of(live, [(12, 20)]) == (b, a)
    assert _runs_of(live, [(30, 30)]) == (c, b)
    assert _runs_of(live, [(50, 90)]) == (c,)
    assert _runs_of(live, [(1, 9)]) == (a,)
    assert _runs_of(live, [(26, 26)]) == (b,)  # the row of b's first slice
    older = ["idem_20261202_8", "idem_20261202_5"]
    assert _runs_of([*live, *older], [(6, 7)]) == (a, "idem_20261202_8")
    assert _runs_of([*live, *older], [(1, 3)]) == (a, "idem_20261202_5")
    assert _runs_of([b, a], [(30, 30)]) == (b,)  # the newest live table reaches on
