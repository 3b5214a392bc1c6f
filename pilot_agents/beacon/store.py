"""Who owns which hostname, kept in SQLite so that ownership outlives beacon restarts.

A name belongs to the first key that registers it, forever: rows are only ever inserted. Live
registrations (endpoints, NAT type) are not stored: they expire within a minute and a half anyway,
and writing every refresh would cost a disk write per node every 25 seconds.

:class:`Registry` is what the beacon core needs, so a shared store (Redis, say, for several
beacons) can replace :class:`NameStore` without touching the core.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError

DB_FILE = "names.sqlite3"
SCHEMA_VERSION = 1


class Registry(Protocol):
    def owner(self, name: str) -> bytes | None: ...
    def claim(self, name: str, key: bytes, now_ns: int) -> bytes: ...
    def names_of(self, key: bytes) -> list[str]: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


class NameStore:
    """The SQLite registry: ``path`` is a file (created if missing) or ``":memory:"``."""

    def __init__(self, path: Path | str) -> None:
        try:
            # isolation_level=None: every statement commits by itself; a claim is one INSERT.
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{path} was written by a newer pilot-agents (schema {version}); upgrade"
                )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS names ("
                " name TEXT PRIMARY KEY,"
                " node_key BLOB NOT NULL,"
                " claimed_ns INTEGER NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS names_by_key ON names (node_key)")
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

    def claim(self, name: str, key: bytes, now_ns: int) -> bytes:
        """Give ``name`` to ``key`` unless someone has it; returns the owner afterwards."""
        owner = self.owner(name)
        if owner is not None:
            return owner  # the common case (every refresh): a read, no write, no fsync
        self._db.execute(
            "INSERT OR IGNORE INTO names (name, node_key, claimed_ns) VALUES (?, ?, ?)",
            (name, key, now_ns),
        )
        owner = self.owner(name)
        assert owner is not None
        return owner

    def names_of(self, key: bytes) -> list[str]:
        rows = self._db.execute(
            "SELECT name FROM names WHERE node_key = ? ORDER BY claimed_ns", (key,)
        ).fetchall()
        return [str(row[0]) for row in rows]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM names").fetchone()[0])

    def close(self) -> None:
        self._db.close()
