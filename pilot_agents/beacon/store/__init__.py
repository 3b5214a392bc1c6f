"""The beacon's store: names and live registrations behind one interface (:class:`Store`).

``sqlite:PATH`` (the default, a file in the beacon's data directory) serves one beacon;
``redis://HOST:PORT/DB`` is shared by a fleet of beacons. ``tests/test_beacon_store.py`` runs
one conformance suite on both.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import ConfigError, StoreUnavailableError
from .base import Claim, Found, NameLimits, Registration, RelayTarget, Store, run_now
from .sqlite import DB_FILE, SqliteStore

NameStore = SqliteStore  # its name before there were two stores

__all__ = [
    "Claim",
    "Found",
    "NameLimits",
    "NameStore",
    "Registration",
    "RelayTarget",
    "SqliteStore",
    "Store",
    "open_store",
    "run_now",
]


async def open_store(spec: str | None, data_dir: Path, *, timeout: float = 2.0) -> Store:
    """The store ``spec`` names (``sqlite:PATH`` or ``redis://...``); None: the SQLite file in
    ``data_dir``. A Redis store must answer now: a beacon does not start on an unreachable one."""
    if spec is None:
        return SqliteStore.in_directory(data_dir)
    if spec.startswith("sqlite:"):
        path = Path(spec.removeprefix("sqlite:"))
        if not path.name:
            raise ConfigError(f"--store {spec}: expected sqlite:PATH")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return SqliteStore(path)
    if spec.startswith(("redis://", "rediss://")):
        from .redis import RedisStore  # redis-py loads only for a beacon that uses it

        store = RedisStore(spec, timeout=timeout)
        try:
            await store.check()
        except StoreUnavailableError as exc:
            await store.aclose()
            raise StoreUnavailableError(f"the store does not answer: {exc}") from None
        return store
    raise ConfigError(
        f"--store {spec}: expected sqlite:PATH or redis://HOST:PORT/DB (default: sqlite in "
        f"the data directory, {DB_FILE})"
    )
