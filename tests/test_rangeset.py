from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilot_agents.net.tunnel.rangeset import RangeSet


def as_tuples(rs: RangeSet) -> list[tuple[int, int]]:
    return [(r.start, r.stop) for r in rs]


def test_empty() -> None:
    rs = RangeSet()
    assert not rs
    assert len(rs) == 0
    assert list(rs) == []
    assert 0 not in rs
    with pytest.raises(IndexError):
        rs.bounds()
    with pytest.raises(IndexError):
        rs.shift()


def test_add_single_and_in_order_append_merges() -> None:
    rs = RangeSet()
    for pn in range(5):
        rs.add(pn)
    assert as_tuples(rs) == [(0, 5)]
    rs.add(7)
    assert as_tuples(rs) == [(0, 5), (7, 8)]
    rs.add(5, 7)  # fills the hole exactly: everything merges
    assert as_tuples(rs) == [(0, 8)]


def test_add_out_of_order_and_overlapping() -> None:
    rs = RangeSet()
    rs.add(10, 20)
    rs.add(0, 5)
    rs.add(30, 40)
    assert as_tuples(rs) == [(0, 5), (10, 20), (30, 40)]
    rs.add(4, 11)  # bridges two ranges
    assert as_tuples(rs) == [(0, 20), (30, 40)]
    rs.add(25, 28)  # lands in a hole
    assert as_tuples(rs) == [(0, 20), (25, 28), (30, 40)]
    rs.add(-5, 100)  # swallows everything
    assert as_tuples(rs) == [(-5, 100)]
    rs.add(3, 9)  # already covered
    assert as_tuples(rs) == [(-5, 100)]


def test_empty_ranges_are_no_ops() -> None:
    rs = RangeSet([(0, 3)])
    rs.add(5, 5)
    rs.add(9, 2)
    rs.subtract(1, 1)
    rs.subtract(2, 0)
    assert as_tuples(rs) == [(0, 3)]


def test_subtract() -> None:
    rs = RangeSet([(0, 10), (20, 30)])
    rs.subtract(3, 5)  # splits a range
    assert as_tuples(rs) == [(0, 3), (5, 10), (20, 30)]
    rs.subtract(8, 25)  # trims two ends
    assert as_tuples(rs) == [(0, 3), (5, 8), (25, 30)]
    rs.subtract(0, 3)  # removes a whole range
    assert as_tuples(rs) == [(5, 8), (25, 30)]
    rs.subtract(100, 200)  # misses
    rs.subtract(10, 20)  # misses, in a hole
    assert as_tuples(rs) == [(5, 8), (25, 30)]
    rs.subtract(0, 1000)
    assert not rs


def test_contains_bounds_shift_index_and_reverse() -> None:
    rs = RangeSet([range(0, 2), range(5, 9), (12, 13)])
    assert [x for x in range(15) if x in rs] == [0, 1, 5, 6, 7, 8, 12]
    assert "1" not in rs
    assert rs.bounds() == range(0, 13)
    assert rs.stop == 13
    assert rs.pairs() == [(0, 2), (5, 9), (12, 13)]
    assert rs[0] == range(0, 2)
    assert rs[-1] == range(12, 13)
    assert list(reversed(rs)) == [range(12, 13), range(5, 9), range(0, 2)]
    assert rs.shift() == range(0, 2)
    assert as_tuples(rs) == [(5, 9), (12, 13)]
    assert len(rs) == 2


def test_equality_and_repr() -> None:
    a = RangeSet([(0, 2), (2, 4)])
    b = RangeSet([(0, 4)])
    assert a == b
    assert a != RangeSet([(0, 3)])
    assert a != [range(0, 4)]
    assert repr(a) == "RangeSet([range(0, 4)])"
    assert eval(repr(RangeSet([(1, 2), (5, 7)]))) == RangeSet([(1, 2), (5, 7)])
    with pytest.raises(TypeError):
        hash(a)


def test_rejects_stepped_range() -> None:
    with pytest.raises(ValueError):
        RangeSet([range(0, 10, 2)])


def test_long_in_order_run_stays_one_range() -> None:
    rs = RangeSet()
    for pn in range(100_000):
        rs.add(pn)
    assert as_tuples(rs) == [(0, 100_000)]


DOMAIN = 64
ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "add1", "subtract", "shift"]),
        st.integers(0, DOMAIN),
        st.integers(0, 12),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_matches_set_model(operations: list[tuple[str, int, int]]) -> None:
    rs = RangeSet()
    model: set[int] = set()
    for op, start, length in operations:
        if op == "add":
            rs.add(start, start + length)
            model.update(range(start, start + length))
        elif op == "add1":
            rs.add(start)
            model.add(start)
        elif op == "subtract":
            rs.subtract(start, start + length)
            model.difference_update(range(start, start + length))
        elif rs:
            lowest = rs.shift()
            assert lowest.start == min(model)
            model.difference_update(lowest)
            assert not model or min(model) > lowest.stop  # shift took a whole maximal run

        # Structure: sorted, non-empty, disjoint and merged (a gap between every pair).
        pieces = as_tuples(rs)
        for s, e in pieces:
            assert s < e
        for (_, e1), (s2, _) in pairwise(pieces):
            assert e1 < s2
        # Same integers as the model, and membership agrees everywhere around the domain.
        assert {x for r in rs for x in r} == model
        for x in range(-2, DOMAIN + 14):
            assert (x in rs) == (x in model)
        assert bool(rs) == bool(model)
        assert rs.pairs() == pieces
        if model:
            assert rs.bounds() == range(min(model), max(model) + 1)
            assert rs.stop == max(model) + 1
        # Canonical form: rebuilding from the model's points gives an equal set.
        rebuilt = RangeSet()
        for x in sorted(model, reverse=True):
            rebuilt.add(x)
        assert rebuilt == rs
