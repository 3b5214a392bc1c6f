"""A set of integers stored as sorted, disjoint, merged half-open ranges.

Used for received packet numbers (the ranges we put in ACK frames), closed stream ids and
stream reassembly offsets. In all of these the values mostly arrive in increasing order, so
adding at or just past the top is the fast path and costs O(1); anything else is a binary
search plus a list splice, O(log n + n) in the number of *ranges*, which callers keep small.

Iteration yields :class:`range` objects (not tuples) so that ``len(r)``, ``x in r`` and slicing
work on each piece, and so that :meth:`bounds` / :meth:`shift` / indexing return the same type.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator


class RangeSet:
    """Sorted, non-overlapping, merged half-open ranges ``[start, stop)``.

    Adjacent ranges are merged (``[0, 2)`` plus ``[2, 4)`` is stored as ``[0, 4)``), so two
    RangeSets holding the same integers compare equal. Empty ranges (``stop <= start``) are
    ignored rather than rejected, matching :class:`range` semantics: a zero-length stream
    frame or an empty subtraction is simply a no-op.
    """

    # Two parallel int lists instead of a list of ``range``: bisect works on them directly and
    # the hot path mutates one int in place instead of allocating a new ``range``.
    __slots__ = ("_starts", "_stops")

    def __init__(self, ranges: Iterable[range | tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        for r in ranges:
            if isinstance(r, range):
                if r.step != 1:
                    raise ValueError(f"RangeSet only holds step-1 ranges, got {r!r}")
                self.add(r.start, r.stop)
            else:
                self.add(r[0], r[1])

    def add(self, start: int, stop: int | None = None) -> None:
        """Add ``[start, stop)`` (``stop`` defaults to ``start + 1``), merging neighbours."""
        if stop is None:
            stop = start + 1
        elif stop <= start:
            return
        starts = self._starts
        stops = self._stops
        # Fast path: in-order arrival extends or follows the highest range.
        if not stops or start > stops[-1]:
            starts.append(start)
            stops.append(stop)
            return
        if start >= starts[-1]:
            if stop > stops[-1]:
                stops[-1] = stop
            return
        # General case. Ranges i..j-1 touch or overlap [start, stop): their stop >= start and
        # their start <= stop (touching counts, so that the result stays merged).
        i = bisect_left(stops, start)
        j = bisect_right(starts, stop)
        if i == j:
            starts.insert(i, start)
            stops.insert(i, stop)
            return
        new_start = min(start, starts[i])
        new_stop = max(stop, stops[j - 1])
        starts[i:j] = (new_start,)
        stops[i:j] = (new_stop,)

    def subtract(self, start: int, stop: int) -> None:
        """Remove every integer in ``[start, stop)``."""
        if stop <= start:
            return
        starts = self._starts
        stops = self._stops
        # Ranges i..j-1 strictly overlap [start, stop): stop > start and start < stop.
        i = bisect_right(stops, start)
        j = bisect_left(starts, stop)
        if i >= j:
            return
        new_starts: list[int] = []
        new_stops: list[int] = []
        if starts[i] < start:
            new_starts.append(starts[i])
            new_stops.append(start)
        if stops[j - 1] > stop:
            new_starts.append(stop)
            new_stops.append(stops[j - 1])
        starts[i:j] = new_starts
        stops[i:j] = new_stops

    def bounds(self) -> range:
        """The smallest range covering every member. Raises IndexError when empty."""
        if not self._starts:
            raise IndexError("bounds() of an empty RangeSet")
        return range(self._starts[0], self._stops[-1])

    @property
    def stop(self) -> int:
        """One past the highest member (``bounds().stop`` without a range object). Raises
        IndexError when empty."""
        return self._stops[-1]

    def pairs(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each range, lowest first (no range objects: an ACK per packet)."""
        # Indexing, not zip(): compiled, this is a native loop; zip(strict=True) is a generic
        # call with a keyword (4 k instructions for one range).
        starts, stops = self._starts, self._stops
        return [(starts[i], stops[i]) for i in range(len(starts))]

    def shift(self) -> range:
        """Remove and return the lowest range. Raises IndexError when empty."""
        # list.pop(0) is O(n) in ranges; callers use this to trim a handful of old ACK ranges.
        if not self._starts:
            raise IndexError("shift() from an empty RangeSet")
        return range(self._starts.pop(0), self._stops.pop(0))

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        i = bisect_right(self._starts, value) - 1
        return i >= 0 and value < self._stops[i]

    def __getitem__(self, index: int) -> range:
        """The ``index``-th range, lowest first; negative indices count from the top."""
        return range(self._starts[index], self._stops[index])

    def __iter__(self) -> Iterator[range]:
        """Ranges from lowest to highest."""
        return map(range, self._starts, self._stops)

    def __reversed__(self) -> Iterator[range]:
        """Ranges from highest to lowest (the order an ACK frame lists them in)."""
        return map(range, reversed(self._starts), reversed(self._stops))

    def __len__(self) -> int:
        """Number of disjoint ranges, not number of integers."""
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._starts == other._starts and self._stops == other._stops

    # Mutable, so not hashable (defining __eq__ already implies this; made explicit for readers).
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inner = ", ".join(
            f"range({a}, {b})" for a, b in zip(self._starts, self._stops, strict=True)
        )
        return f"RangeSet([{inner}])"
