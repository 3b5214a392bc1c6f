"""What every command module shares: the running Node, the trust store, the static peers, and
the way names and errors are explained to someone at a command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..errors import (
    ConfigError,
    PeerUnreachableError,
    PilotError,
    PortClosedError,
    UnknownHostError,
    not_trusted,
)
from ..home import read_private_text, write_private
from ..net.traversal.beacon_wire import canonical_name
from ..node.node import Node, PeerInfo
from ..trust import TrustStore, first_line, is_node_id
from .options import DaemonOptions

STATIC_PEERS_FILE = "static-peers.json"


class StaticPeer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node_id: str
    address: str  # HOST:PORT
    hostname: str | None = None


class StaticPeersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    peers: list[StaticPeer] = Field(default_factory=list)


def load_static_peers(home: Path) -> dict[str, StaticPeer]:
    path = home / STATIC_PEERS_FILE
    try:
        data = StaticPeersFile.model_validate_json(read_private_text(path))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # (a ValidationError, or text that is not UTF-8)
        raise ConfigError(f"{path} is not a valid static peers file ({first_line(exc)}): fix "
                          "or remove it") from None
    return {p.node_id: p for p in data.peers}


def save_static_peers(home: Path, peers: dict[str, StaticPeer]) -> None:
    write_private(home / STATIC_PEERS_FILE,
                  StaticPeersFile(peers=list(peers.values())).model_dump_json(indent=2) + "\n")


@dataclass(frozen=True)
class Target:
    """A peer named in a request, resolved."""

    node_id: str
    hostname: str | None
    info: PeerInfo | None = None  # what the beacon said, when it was asked
    node_arg: str = ""  # what to pass to the Node: a pinned name (see trusted_target) or the id

    @property
    def label(self) -> str:
        return self.hostname or self.node_id


class DaemonContext:
    def __init__(self, options: DaemonOptions, node: Node, store: TrustStore,
                 static: dict[str, StaticPeer]) -> None:
        self.options = options
        self.home = options.home
        self.node = node
        self.store = store
        self.static = static

    @property
    def has_beacon(self) -> bool:
        return bool(self.options.beacon)

    def hostname(self) -> str | None:
        return self.node.hostname or self.options.hostname

    def me(self) -> str:
        """How a peer's user names this node."""
        return self.hostname() or self.node.node_id

    def label(self, node_id: str) -> str:
        name = self.store.name_of(node_id)
        if name is None and node_id in self.static:
            name = self.static[node_id].hostname
        return name or node_id

    def label_or_none(self, node_id: str) -> str | None:
        label = self.label(node_id)
        return None if label == node_id else label

    def _static_by_name(self, name: str) -> StaticPeer | None:
        name = canonical_name(name)
        for peer in self.static.values():
            if peer.hostname is not None and canonical_name(peer.hostname) == name:
                return peer
        return None

    async def lookup(self, target: str) -> Target:
        """A name or node id resolved, with the pin checked. Names are compared as the beacon
        compares them (:func:`canonical_name`): ``Alice`` is the pinned ``alice``."""
        target = canonical_name(target)
        if is_node_id(target):
            node_id = target
            return Target(node_id, self.store.name_of(node_id) or (
                self.static[node_id].hostname if node_id in self.static else None))
        if self.has_beacon:
            info = await self.node.resolve(target)
            self.store.check_pin(target, info.node_id)
            return Target(info.node_id, target, info)
        pinned = self.store.pinned(target)
        if pinned is not None:
            return Target(pinned.node_id, target)
        static = self._static_by_name(target)
        if static is not None:
            return Target(static.node_id, target)
        raise UnknownHostError(
            f"unknown host {target!r}: no beacon is configured (start the daemon with "
            "--beacon HOST:PORT), and no trusted or static peer has that name"
        )

    async def trusted_target(self, target: str) -> Target:
        """A peer we may talk to. Refuses untrusted peers with the command that fixes it.

        A name pinned by ``trust add`` is not looked up: the Node, which has the same pin,
        connects to the pinned key at once and asks the beacon only if that key does not
        answer (KeyMismatchError if the name moved). Any other name is resolved here, once."""
        name = canonical_name(target)
        if name and name in (self.node.node_id, (self.hostname() or "").lower()):
            # Not "not trusted": trusting one's own id is refused, so that hint leads nowhere.
            raise ConfigError(f"{name!r} is this node itself: name another node (a node has "
                              "no tunnel to itself)")
        pinned = self.store.pinned(name) if self.has_beacon and not is_node_id(name) else None
        if pinned is not None:
            return Target(pinned.node_id, name, None, name)
        found = await self.lookup(target)
        entry = self.store.get(found.node_id)
        refusal = not_trusted(found.hostname or name, None if entry is None else entry.state)
        if refusal is not None:
            raise refusal
        return Target(found.node_id, found.hostname, found.info, found.node_id)

    def explain(self, exc: PilotError, node_id: str, label: str, port: int | None) -> PilotError:
        """The Node's error, reworded for someone at a command line."""
        if isinstance(exc, PortClosedError) and port is not None:
            return PortClosedError(
                f"{label} is not listening on port {port} (it must listen first, e.g. "
                f"'pilotctl listen {port}' on that machine)", exc.code, exc.reason,
            )
        if isinstance(exc, PeerUnreachableError):
            entry = self.store.get(node_id)
            hint = ""
            if entry is not None and entry.state == "outgoing":
                hint = (f"; if it does not trust you yet, run 'pilotctl trust add {self.me()}' "
                        "on that machine")
            return PeerUnreachableError(f"{label} did not answer: {exc}{hint}")
        return exc
