"""The default store: names in SQLite, so that ownership outlives beacon restarts; live
registrations in memory, for the one beacon that uses the file.

A name belongs to the first key that registers it for as long as that key keeps using it: each
row records when its owner last registered with it (``last_used_ns``, written at most once per
``BeaconConfig.name_touch_interval``, not on every refresh) and the source IP that claimed it (for
the per-address cap). The beacon deletes names unused for ``BeaconConfig.name_expiry``; the times
are wall-clock, so a restart keeps them. Live registrations are not written to the file: they
expire within a minute and a half anyway, and writing every refresh would cost a disk write per
node every 25 seconds.

Every call completes without suspending (``synchronous``): the beacon's core runs it on the spot.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Hashable
from pathlib import Path
from typing import TypeVar

from ...errors import ConfigError
from ...net.traversal.beacon_wire import Status
from .base import Claim, Found, NameLimits, Registration, RelayTarget

DB_FILE = "names.sqlite3"
SCHEMA_VERSION = 2


class SqliteStore:
    """The SQLite store: ``path`` is a file (created if missing) or ``":memory:"``."""

    def __init__(self, path: Path | str) -> None:
        try:
            # isolation_level=None: every statement commits by itself; a claim is one INSERT.
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # No fsync per commit (6 ms each here: 170 claims/s, the beacon stalled meanwhile);
            # in WAL mode the file stays consistent, a power cut loses only the last claims.
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{path} was written by a newer pilot-agents (schema {version}); upgrade"
                )
            if version == 1:
                # Names from before expiry count as used when the beacon first opens the file.
                self._db.execute("ALTER TABLE names ADD COLUMN last_used_ns INTEGER")
                self._db.execute("ALTER TABLE names ADD COLUMN claimed_from TEXT")
                self._db.execute(
                    "UPDATE names SET last_used_ns = ?, claimed_from = ''", (time.time_ns(),)
                )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS names ("
                " name TEXT PRIMARY KEY,"
                " node_key BLOB NOT NULL,"
                " claimed_ns INTEGER NOT NULL,"
                " last_used_ns INTEGER NOT NULL,"
                " claimed_from TEXT NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS names_by_key ON names (node_key)")
            self._db.execute("CREATE INDEX IF NOT EXISTS names_by_use ON names (last_used_ns)")
            self._db.execute("CREATE INDEX IF NOT EXISTS names_by_source ON names (claimed_from)")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"cannot open the beacon's name store {path}: {exc}") from None
        self._path = path
        # key -> (registration, when it expires on the monotonic clock)
        self._registrations: dict[bytes, tuple[Registration, float]] = {}
        # (beacon id, key) -> the same, for guests: one process holds its guests in memory
        # anyway, so only the conformance suite writes these.
        self._guests: dict[tuple[str, bytes], tuple[Registration, float]] = {}
        self._blocks: dict[bytes, dict[bytes, int]] = {}  # one process: for the interface's sake

    @classmethod
    def in_directory(cls, data_dir: Path) -> SqliteStore:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(data_dir / DB_FILE)

    def owner(self, name: str) -> bytes | None:
        row = self._db.execute("SELECT node_key FROM names WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def claim(self, name: str, key: bytes, now_ns: int, source: str) -> bytes:
        """Give ``name`` to ``key`` (claimed from IP ``source``) unless someone has it; returns
        the owner afterwards."""
        owner = self.owner(name)
        if owner is not None:
            return owner
        self._db.execute(
            "INSERT OR IGNORE INTO names (name, node_key, claimed_ns, last_used_ns, claimed_from)"
            " VALUES (?, ?, ?, ?, ?)",
            (name, key, now_ns, now_ns, source),
        )
        owner = self.owner(name)
        assert owner is not None
        return owner

    def names_of(self, key: bytes) -> list[str]:
        """Oldest claim first."""
        rows = self._db.execute(
            "SELECT name FROM names WHERE node_key = ? ORDER BY claimed_ns", (key,)
        ).fetchall()
        return [str(row[0]) for row in rows]

    def claimed_from(self, source: str) -> int:
        """How many names claimed from IP ``source`` are still held."""
        query = "SELECT COUNT(*) FROM names WHERE claimed_from = ?"
        return int(self._db.execute(query, (source,)).fetchone()[0])

    def touch(self, name: str, now_ns: int) -> None:
        """Its owner registered with ``name`` at ``now_ns``: it is in use."""
        self._db.execute("UPDATE names SET last_used_ns = ? WHERE name = ?", (now_ns, name))

    def release(self, name: str) -> None:
        self._db.execute("DELETE FROM names WHERE name = ?", (name,))

    def expire(self, unused_since_ns: int) -> int:
        """Delete the names last used before ``unused_since_ns``; how many went."""
        return self._db.execute(
            "DELETE FROM names WHERE last_used_ns < ?", (unused_since_ns,)
        ).rowcount

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM names").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    # -- the Store interface -------------------------------------------------------------------

    @property
    def synchronous(self) -> bool:
        return True

    def describe(self) -> str:
        return f"sqlite:{self._path}"

    async def claim_name(
        self, name: str, key: bytes, now_ns: int, source: str, limits: NameLimits
    ) -> Claim:
        owner = self.owner(name)
        if owner == key:
            self.touch(name, now_ns)
            return Claim(Status.OK, key)
        if owner is not None:
            return Claim(Status.NAME_TAKEN, owner)
        if self.claimed_from(source) >= limits.per_source:
            return Claim(Status.NAME_LIMIT, None)
        held = self.names_of(key)
        released = tuple(held[: max(0, len(held) - limits.per_key + 1)])
        for old in released:
            self.release(old)
        owner = self.claim(name, key, now_ns, source)
        return Claim(Status.OK if owner == key else Status.NAME_TAKEN, owner, released)

    async def find_name(self, name: str) -> Found:
        key = self.owner(name)
        return Found(key, name, None if key is None else _live(self._registrations, key))

    async def find_key(self, key: bytes, guest_at: str | None = None) -> Found:
        names = self.names_of(key)
        guest = None if guest_at is None else _live(self._guests, (guest_at, key))
        return Found(key, names[0] if names else None, _live(self._registrations, key), guest)

    async def publish(self, registration: Registration, ttl: float) -> None:
        _keep(self._registrations, registration.key, registration, ttl)

    async def publish_guest(self, guest: Registration, ttl: float) -> None:
        _keep(self._guests, (guest.home, guest.key), guest, ttl)

    async def expire_names(self, unused_since_ns: int) -> int:
        _expire_head(self._registrations)
        _expire_head(self._guests)
        return self.expire(unused_since_ns)

    async def name_count(self) -> int:
        return self.count()

    async def block_relay(self, receiver: bytes, sender: bytes, until_ns: int) -> None:
        blocks = self._blocks.setdefault(receiver, {})
        if until_ns:
            blocks[sender] = until_ns
        else:
            blocks.pop(sender, None)
        now_ns = time.time_ns()
        for blocked, until in list(blocks.items()):
            if until <= now_ns:
                del blocks[blocked]
        if not blocks:
            del self._blocks[receiver]

    async def relay_target(self, key: bytes, guest_at: str | None = None) -> RelayTarget:
        guest = None if guest_at is None else _live(self._guests, (guest_at, key))
        blocks = dict(self._blocks.get(key, {}))
        return RelayTarget(_live(self._registrations, key), blocks, guest)

    async def aclose(self) -> None:
        self.close()


Entry = TypeVar("Entry", bound=Hashable)


def _keep(
    table: dict[Entry, tuple[Registration, float]], key: Entry, value: Registration, ttl: float
) -> None:
    # Moved to the end: the dict stays in order of expiry (one beacon, one TTL).
    table.pop(key, None)
    table[key] = (value, time.monotonic() + ttl)


def _live(table: dict[Entry, tuple[Registration, float]], key: Entry) -> Registration | None:
    entry = table.get(key)
    return entry[0] if entry is not None and entry[1] > time.monotonic() else None


def _expire_head(table: dict[Entry, tuple[Registration, float]]) -> None:
    """Drop the expired head of ``table``: walking all of it took 100 ms at 100k nodes, every
    sweep. (An entry behind a longer TTL waits; _live checks the expiry anyway.)"""
    now = time.monotonic()
    expired = []
    for key, (_, expires) in table.items():
        if expires > now:
            break
        expired.append(key)
    for key in expired:
        del table[key]
