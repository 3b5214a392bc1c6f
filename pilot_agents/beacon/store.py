"""Who owns which hostname, kept in SQLite so that ownership outlives beacon restarts.

A name belongs to the first key that registers it for as long as that key keeps using it: each
row records when its owner last registered with it (``last_used_ns``, written at most once per
``BeaconConfig.name_touch_interval``, not on every refresh) and the source IP that claimed it (for
the per-address cap). The beacon deletes names unused for ``BeaconConfig.name_expiry``; the times
are wall-clock, so a restart keeps them. Live registrations (endpoints, NAT type) are not stored:
they expire within a minute and a half anyway, and writing every refresh would cost a disk write
per node every 25 seconds.

:class:`Registry` is what the beacon core needs, so a shared store (Redis, say, for several
beacons) can replace :class:`NameStore` without touching the core.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError

DB_FILE = "names.sqlite3"
SCHEMA_VERSION = 2


class Registry(Protocol):
    def owner(self, name: str) -> bytes | None: ...
    def claim(self, name: str, key: bytes, now_ns: int, source: str) -> bytes: ...
    def names_of(self, key: bytes) -> list[str]: ...
    def claimed_from(self, source: str) -> int: ...
    def touch(self, name: str, now_ns: int) -> None: ...
    def release(self, name: str) -> None: ...
    def expire(self, unused_since_ns: int) -> int: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


class NameStore:
    """The SQLite registry: ``path`` is a file (created if missing) or ``":memory:"``."""

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

    @classmethod
    def in_directory(cls, data_dir: Path) -> NameStore:
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
