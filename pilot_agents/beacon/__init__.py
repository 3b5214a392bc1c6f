"""The beacon: the one server of pilot-agents. It registers nodes under names, answers STUN,
introduces two nodes so that they punch through their NATs at the same moment, and relays sealed
packets when punching fails. It never sees plaintext.

:mod:`.server` is the sans-IO core, :mod:`.store` the registry of names and live registrations
(SQLite for one beacon, Redis for a fleet), :mod:`.service` the asyncio driver and command line
(``pilot-agents beacon``).
"""

from .server import BeaconConfig, BeaconServer, BeaconStats
from .store import NameStore, SqliteStore, Store

__all__ = ["BeaconConfig", "BeaconServer", "BeaconStats", "NameStore", "SqliteStore", "Store"]
