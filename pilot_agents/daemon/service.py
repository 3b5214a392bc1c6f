"""The daemon: one Node per home, its trust store, and the local ZeroMQ API (``docs/ipc.md``),
wired together and run until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from .. import ipc
from ..errors import (
    BeaconError,
    ConfigError,
    NameTakenError,
    PeerUnreachableError,
    PilotError,
    PilotTimeoutError,
)
from ..net.io.metrics_http import MetricsServer
from ..node.node import Node
from ..runtime import STOPPING
from ..trust import TrustStore, is_node_id
from ..version import build
from .admin import AdminCommands
from .clients import Clients
from .context import DaemonContext, load_static_peers
from .datasock import DataSockets
from .dispatch import DispatchTable, Reply
from .lock import HomeLock
from .messaging import Messaging
from .metrics import serve as serve_metrics
from .options import DaemonOptions
from .publishing import Publishing
from .server import IpcServer
from .trust_commands import TrustCommands

log = logging.getLogger("pilot_agents.daemon")

Ready = Callable[[Reply | PilotError], None]  # told our info once serving, or why we failed
JANITOR_PERIOD = 30.0  # seconds between looks for idle streams, at most


class Daemon:
    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.home = options.home
        self._lock = HomeLock(options.home)
        self._stop = asyncio.Event()
        self._node: Node | None = None
        self._messaging: Messaging | None = None
        self._publishing: Publishing | None = None
        self._server: IpcServer | None = None
        self._store: TrustStore | None = None
        self._metrics: MetricsServer | None = None
        self._messaging_closed = False

    async def run(self, ready: Ready) -> None:
        """Start, call ``ready`` with our info (or the error that stopped us), serve until
        stopped, clean up."""
        try:
            admin, server = await self._start()
        except PilotError as exc:
            await self._shutdown()
            ready(exc)
            return
        except BaseException:
            await self._shutdown()
            raise
        loop = asyncio.get_running_loop()
        for sig in STOPPING:
            loop.add_signal_handler(sig, self._stop.set)
        info = admin.snapshot()
        log.info("ready: %s (%s) home %s, udp %s, beacon %s", info["hostname"], info["node_id"],
                 self.home, ",".join(info["endpoints"]), info["beacon"])
        ready(info)
        serve = asyncio.create_task(server.serve())
        janitor = asyncio.create_task(self._janitor())
        try:
            await self._stop.wait()
        finally:
            log.info("stopping")
            for task in (serve, janitor):
                task.cancel()
            await asyncio.gather(serve, janitor, server.cancel_all(), return_exceptions=True)
            for sig in STOPPING:
                loop.remove_signal_handler(sig)
            await self._shutdown()
            log.info("stopped")

    def stop(self) -> None:
        self._stop.set()

    async def _start(self) -> tuple[AdminCommands, IpcServer]:
        opts = self.options
        build()  # of the code we run, now: an upgrade may replace the files while we do
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock.acquire()
        ipc_address = ipc.endpoint(self.home)  # checks the path length before anything else
        if opts.hostname is not None and is_node_id(opts.hostname):
            raise ConfigError(f"hostname {opts.hostname!r} looks like a node id: choose another")
        store = self._store = TrustStore.load(self.home)
        static = load_static_peers(self.home)
        # Without a beacon the hostname stays the daemon's own label (the Node registers names
        # only at a beacon).
        node = self._node = Node(home=self.home, listen=opts.listen, beacon=opts.beacon or None,
                                 hostname=opts.hostname if opts.beacon else None)
        ctx = DaemonContext(opts, node, store, static)
        messaging = self._messaging = Messaging(ctx)
        trust = TrustCommands(ctx, messaging)
        admin = AdminCommands(ctx, messaging, self._close_messaging)
        publishing = self._publishing = Publishing(ctx, messaging)
        dispatch = DispatchTable()
        for commands in (messaging, trust, admin, publishing):
            commands.register(dispatch)
        node.on_trust_request = trust.on_trust_request
        for entry in store.trusted():
            node.trust(entry.node_id, entry.hostname)
        for peer in static.values():
            try:
                node.add_peer(peer.node_id, peer.address)
            except ConfigError as exc:  # saved before it was checked: never fatal at start
                log.warning("static peer %s skipped: %s", peer.node_id, exc)
        try:
            await node.start()
        except (PeerUnreachableError, PilotTimeoutError) as exc:
            raise BeaconError(f"cannot reach the beacon at {opts.beacon}: {exc}") from None
        except NameTakenError as exc:
            raise NameTakenError(
                f"the hostname {opts.hostname!r} is taken at the beacon {opts.beacon} ({exc}): "
                "choose another --hostname"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot start the node: {exc.strerror or exc}") from None
        for port in opts.inbox_ports:
            messaging.listen_port(port, permanent=True)
        messaging.restore_unread()
        server = self._server = IpcServer(opts, dispatch, messaging.requeue, self._stop.set,
                                          Clients(messaging), DataSockets(messaging))
        server.bind(ipc_address)
        messaging.publish = server.publish
        if opts.metrics:
            self._metrics = await serve_metrics(opts.metrics, admin.snapshot, node.peers)
        self._lock.write_pid()
        return admin, server

    async def _shutdown(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        await self._close_messaging()
        if self._node is not None:
            with contextlib.suppress(Exception):
                await self._node.close()
        if self._store is not None:
            self._store.close()  # writes what the batching still holds
        if self._server is not None:
            self._server.close()
        self._lock.release()

    async def _close_messaging(self) -> str | None:
        """Close the publishers and the ports, keeping what no client read (once: a ``stop``
        does it before its answer, which says what was lost, if anything)."""
        if self._messaging_closed:
            return None
        self._messaging_closed = True
        if self._publishing is not None:
            await self._publishing.close_all()  # says bye while the tunnels are up
        if self._messaging is not None:
            return await self._messaging.close_all()
        return None

    async def _janitor(self) -> None:
        assert self._messaging is not None
        while True:
            await asyncio.sleep(min(JANITOR_PERIOD, self.options.stream_idle_timeout / 4))
            self._messaging.drop_idle_streams()
