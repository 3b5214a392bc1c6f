"""What the daemon and its peers look like: ``info``, ``peers``, ``resolve``, ``add_peer``,
``ping``, ``stop``."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable

from .. import ipc
from ..addressing import parse_host_port
from ..errors import ConfigError, PilotError
from ..identity import key_from_node_id
from ..trust import is_node_id
from ..version import VERSION, build
from .context import DaemonContext, StaticPeer, save_static_peers
from .dispatch import DispatchTable, Reply
from .messaging import Messaging
from .requests import (
    AddPeerRequest,
    InfoRequest,
    PeersRequest,
    PingRequest,
    ResolveRequest,
    StopRequest,
)


class AdminCommands:
    def __init__(self, ctx: DaemonContext, messaging: Messaging,
                 stopping: Callable[[], Awaitable[str | None]]) -> None:
        """``stopping``: what a ``stop`` does before it is answered (the daemon stops once it
        is): close messaging, keeping what no client read; what was lost, if anything."""
        self.ctx = ctx
        self.messaging = messaging
        self.stopping = stopping
        self.started = time.time()

    def register(self, table: DispatchTable) -> None:
        table.add(InfoRequest, self.info)
        table.add(PeersRequest, self.peers)
        table.add(ResolveRequest, self.resolve)
        table.add(AddPeerRequest, self.add_peer)
        table.add(PingRequest, self.ping)
        table.add(StopRequest, self.stop)

    def snapshot(self) -> Reply:
        ctx = self.ctx
        node = ctx.node.info()
        ports = sorted(self.messaging.ports.values(), key=lambda s: s.port)
        return {
            "node_id": node.node_id, "virtual_address": node.virtual_address,
            "hostname": node.hostname or ctx.options.hostname, "nat_type": node.nat_type,
            "endpoints": list(node.endpoints), "beacon": node.beacon,
            "home": str(ctx.home), "pid": os.getpid(), "version": VERSION, "build": build(),
            "protocol": ipc.PROTOCOL_VERSION, "uptime": round(time.time() - self.started, 1),
            "listening": [
                {"port": s.port, "publish": s.publish, "buffered": len(s.inbox),
                 "buffered_bytes": s.inbox.bytes, "unacked": s.inbox.held,
                 "received": s.received} for s in ports
            ],
            "streams": len(self.messaging.streams), "pub_endpoint": ipc.pub_endpoint(ctx.home),
            "static_peers": len(ctx.static),
            "trusted": len(ctx.store.trusted()), "pending": len(ctx.store.pending()),
        }

    async def info(self, req: InfoRequest) -> Reply:
        return self.snapshot()

    async def peers(self, req: PeersRequest) -> Reply:
        peers = []
        for p in self.ctx.node.peers():
            entry = self.ctx.store.get(p.node_id)
            peers.append({
                "node_id": p.node_id,
                "hostname": p.hostname or self.ctx.label_or_none(p.node_id),
                "path": p.path, "rtt": p.rtt, "bytes_in": p.bytes_in, "bytes_out": p.bytes_out,
                "established": p.established, "trust": entry.state if entry else None,
            })
        return {"peers": peers}

    async def resolve(self, req: ResolveRequest) -> Reply:
        found = await self.ctx.lookup(req.name)
        entry = self.ctx.store.get(found.node_id)
        if found.info is not None:
            candidates = [f"{h}:{p}" for h, p in found.info.candidates]
            nat_type, source = found.info.nat_type, "beacon"
        else:
            static = self.ctx.static.get(found.node_id)
            candidates = [static.address] if static else []
            nat_type = "unknown"
            source = "node id" if is_node_id(req.name) else (
                "trust store" if self.ctx.store.pinned(req.name) else "static peers")
        return {"node_id": found.node_id, "hostname": found.hostname, "candidates": candidates,
                "nat_type": nat_type, "source": source,
                "trust": entry.state if entry else None}

    async def add_peer(self, req: AddPeerRequest) -> Reply:
        node_id = req.node_id.strip().lower()
        key_from_node_id(node_id)  # ConfigError if it is not a node id
        if req.hostname is not None and is_node_id(req.hostname):
            raise ConfigError(f"the name {req.hostname!r} looks like a node id")
        host, port = parse_host_port(req.address)
        try:  # now: a name that never resolves would be a peer that never answers, unexplained
            await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:  # (UnicodeError: not a name, "a..b")
            raise ConfigError(f"cannot resolve {host!r} in {req.address!r}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        self.ctx.node.add_peer(node_id, (host, port))
        self.ctx.static[node_id] = StaticPeer(node_id=node_id, address=req.address,
                                              hostname=req.hostname)
        save_static_peers(self.ctx.home, self.ctx.static)
        return {"node_id": node_id, "address": req.address, "hostname": req.hostname}

    async def ping(self, req: PingRequest) -> Reply:
        target = await self.ctx.trusted_target(req.target)
        try:
            result = await self.ctx.node.ping(target.node_arg, req.timeout)
        except PilotError as exc:
            raise self.ctx.explain(exc, target.node_id, target.label, None) from None
        self.ctx.store.confirm(target.node_id)
        return {"peer": target.node_id, "hostname": target.hostname, "rtt": result.rtt,
                "path": result.path}

    async def stop(self, req: StopRequest) -> Reply:
        reply: Reply = {"pid": os.getpid()}
        lost = await self.stopping()
        if lost is not None:
            reply["lost"] = lost
        return reply
