"""Sliding-window replay protection for received packet numbers (RFC 6479, as WireGuard does).

A packet is accepted once: numbers above the highest seen slide the window, numbers inside it are
checked against a ring of flags, and numbers older than the window are refused because we can no
longer tell whether they were seen.
"""

from __future__ import annotations


class ReplayWindow:
    """Remembers the last ``size`` packet numbers up to the highest one accepted.

    A ring with a byte per packet number, not one big integer used as a bitmap: sliding that
    bitmap allocated three integers of ``size`` bits for every packet received.
    """

    __slots__ = ("_highest", "_seen", "size")

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._highest = -1
        # For every n in (highest - size, highest]: _seen[n % size] == 1 iff n was accepted.
        self._seen = bytearray(size)

    @property
    def highest(self) -> int:
        return self._highest

    def check(self, number: int) -> bool:
        """True if ``number`` is new. Does not record it: call :meth:`accept` after decryption,
        so a forged packet can't move the window."""
        if number > self._highest:
            return True
        return self._highest - number < self.size and not self._seen[number % self.size]

    def accept(self, number: int) -> None:
        size = self.size
        if number > self._highest:
            skipped = number - self._highest - 1  # numbers passed over: not seen (yet)
            if skipped >= size:
                self._seen = bytearray(size)
            elif skipped > 0:
                start = (self._highest + 1) % size
                end = start + skipped
                if end <= size:
                    self._seen[start:end] = bytes(skipped)
                else:
                    self._seen[start:] = bytes(size - start)
                    self._seen[: end - size] = bytes(end - size)
            self._highest = number
        self._seen[number % size] = 1
