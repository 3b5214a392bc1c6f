"""The greatest handshake timestamp accepted from each peer, kept in the node's home.

The mux refuses an initiation whose timestamp is not newer than the last one accepted from that
peer (as WireGuard requires of its TAI64N). Kept only in memory, that check forgot everything on
a restart, and a captured initiation was accepted again (issue #11, finding 7). This store is
the mux's ``timestamps`` mapping, written to ``initiation-timestamps.json`` (mode 0600,
atomically) at most once per ``flush_delay`` seconds after a change, and when the node closes.

A node that crashes loses the changes of its last ``flush_delay`` seconds: an initiation accepted
in that window could be replayed once after the restart. A bad file is ignored with a warning,
never fatal: the worst it costs is that protection for the entries it held.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from ..home import write_private

log = logging.getLogger("pilot_agents.node")

FILE_NAME = "initiation-timestamps.json"
_KEY_SIZE = 32


class TimestampStore(MutableMapping[bytes, int]):
    """Peer Ed25519 key -> greatest accepted initiation timestamp (ns), saved in batches."""

    def __init__(self, path: Path, flush_delay: float = 1.0) -> None:
        """``flush_delay``: seconds between a change and its write (changes meanwhile share it)."""
        self.path = path
        self.flush_delay = flush_delay
        self.writes = 0
        self._values = self._load()
        self._dirty = False
        self._flush_handle: asyncio.TimerHandle | None = None

    def _load(self) -> dict[bytes, int]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s (%s): replay protection starts afresh", self.path, exc)
            return {}
        values: dict[bytes, int] = {}
        if not isinstance(raw, dict):
            log.warning("ignoring %s: not a JSON object", self.path)
            return values
        for key_hex, value in raw.items():
            try:
                key = bytes.fromhex(key_hex)
            except ValueError:
                continue
            if len(key) == _KEY_SIZE and type(value) is int and value > 0:
                values[key] = value
        return values

    def __getitem__(self, key: bytes) -> int:
        return self._values[key]

    def __setitem__(self, key: bytes, value: int) -> None:
        self._values[key] = value
        self._changed()

    def __delitem__(self, key: bytes) -> None:
        del self._values[key]
        self._changed()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def _changed(self) -> None:
        self._dirty = True
        if self._flush_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop to batch on
            self.flush()
            return
        self._flush_handle = loop.call_later(self.flush_delay, self.flush)

    def flush(self) -> None:
        """Write the changes now, if there are any."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._dirty:
            return
        self._dirty = False
        text = json.dumps({key.hex(): value for key, value in self._values.items()}, indent=1)
        try:
            write_private(self.path, text + "\n")
        except OSError as exc:
            # Called from the event loop: a full disk must not take the node down with it.
            log.warning("cannot save %s: %s", self.path, exc)
            self._dirty = True
            return
        self.writes += 1
