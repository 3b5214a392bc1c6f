"""Text that came from another node, made safe to show: control characters (C0, DEL, C1) and the
bidirectional controls could otherwise forge table rows, colours, window titles or reorder what
a terminal shows (Trojan Source)."""

from __future__ import annotations

import re

UNSAFE_CHARACTERS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def has_unsafe_characters(text: str) -> bool:
    return UNSAFE_CHARACTERS.search(text) is not None


def escape_unsafe(text: str) -> str:
    """``text`` with each unsafe character as its escape (``\\x1b``, ``\\n``, ``\\u202e``)."""
    return UNSAFE_CHARACTERS.sub(lambda m: repr(m.group())[1:-1], text)
