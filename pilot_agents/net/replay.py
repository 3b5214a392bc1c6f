"""Sliding-window replay protection for received packet numbers (RFC 6479, as WireGuard does).

A packet is accepted once: numbers above the highest seen slide the window, numbers inside it are
checked against a bitmap, and numbers older than the window are refused because we can no longer
tell whether they were seen.
"""

from __future__ import annotations


class ReplayWindow:
    """Remembers the last ``size`` packet numbers below the highest one accepted."""

    __slots__ = ("_bitmap", "_highest", "_mask", "size")

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._mask = (1 << size) - 1
        self._highest = -1
        # Bit i set means packet number (highest - i) was accepted.
        self._bitmap = 0

    @property
    def highest(self) -> int:
        return self._highest

    def check(self, number: int) -> bool:
        """True if ``number`` is new. Does not record it: call :meth:`accept` after decryption,
        so a forged packet can't move the window."""
        if number > self._highest:
            return True
        age = self._highest - number
        return age < self.size and not (self._bitmap >> age) & 1

    def accept(self, number: int) -> None:
        if number > self._highest:
            shift = number - self._highest
            self._bitmap = ((self._bitmap << shift) | 1) & self._mask if shift < self.size else 1
            self._highest = number
        else:
            self._bitmap |= 1 << (self._highest - number)
