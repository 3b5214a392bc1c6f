"""Req/rep through two forwarders standing in for the daemons: what the daemon path's topology
costs by itself, and what our tunnel adds to it without the daemon's and the SDK's IPC layers.

Each measurement has the daemon path's topology: the requester and the replier each talk to a
forwarder process of their own over a unix stream socket, and the two forwarders talk over UDP
on 127.0.0.1. A round trip crosses four processes and six hops, as SDK → daemon → tunnel →
daemon → SDK does. The requester and the replier are minimal (a uvloop ``Protocol`` writes the
100 B request and waits for as many bytes back; the replier echoes), so each case measures its
forwarders:

- ``floor-c``: forwarders in C (``floor_forward.c``, built with ``cc`` when the role starts)
  that only read and write: the kernel's share and the wake-ups';
- ``floor-py``: the same forwarder in Python on uvloop: what the event loop adds;
- ``floor-node``: each forwarder an embedded :class:`pilot_agents.Node` (Noise handshake,
  encryption, reliability, flow control). What its client writes goes into one stream
  (``Connection.write``), and what the stream delivers goes back as it comes
  (``set_taker``): our tunnel with the thinnest IPC around it, where the daemon has its
  requests, deliveries and credit, and the SDK its client.

Req/rep only: these forwarders move bytes in lockstep, one message at a time, and keep none of
a transport's promises beyond that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import pilot_agents
from benchmarks.harness import HOST, Control, RttResult, adrive, rtt_session
from benchmarks.pattern_harness import PatternParams, ReqRepCase
from pilot_agents import Node
from pilot_agents.node.connection import Message as NodeMessage

PORT = 2001
"""The virtual port the replier's Node listens on (``floor-node``)."""
SOURCE = Path(__file__).with_name("floor_forward.c")
R = TypeVar("R")


# --- the roles' side: a minimal client and echo on a forwarder's unix socket -------------------


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's are no subclasses

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _Requests(asyncio.Protocol):
    """Writes a request and waits for as many bytes back."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.want = 0
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and len(self.buffer) >= self.want and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the forwarder hung up"))

    async def roundtrip(self, request: bytes, timeout: float) -> bytes:
        self.want = len(request)
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        async with asyncio.timeout(timeout):
            await self.waiter
        reply = bytes(self.buffer[:self.want])
        del self.buffer[:self.want]
        return reply


class Floor(ReqRepCase):
    kind: ClassVar[str]

    def run_async(self, main: Coroutine[Any, Any, R]) -> R:
        return pilot_agents.run(main)  # uvloop, as the daemon path's processes

    def command(self, workdir: Path, socket: Path, peer: dict[str, Any] | None) -> list[str]:
        """The forwarder's command line; ``peer``: the other forwarder's card (else it
        answers whoever writes to it first)."""
        command = [sys.executable, "-m", "benchmarks.patterns_cases.floor", self.kind,
                   tempfile.mkdtemp(prefix="node-", dir=workdir), str(socket)]
        return command if peer is None else [*command, json.dumps(peer)]

    async def replier(self, ctl: Control, p: PatternParams) -> None:
        socket = Path(tempfile.mkdtemp(prefix="floor-", dir=p.workdir)) / "b.sock"
        with self.forwarder(Path(p.workdir), socket, None) as (card, proc):
            ctl.publish(card=card)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(ctl.peer()["card"]) + "\n")  # a Node trusts it
            proc.stdin.flush()
            await _ready(proc, p.wait)
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_unix_connection(_Echo, str(socket))
            ctl.publish(listening=True)
            await ctl.await_stop(p.deadline)
            transport.close()

    async def requester(self, ctl: Control, p: PatternParams) -> RttResult:
        socket = Path(tempfile.mkdtemp(prefix="floor-", dir=p.workdir)) / "a.sock"
        with self.forwarder(Path(p.workdir), socket, ctl.peer()["card"]) as (card, proc):
            ctl.publish(card=card)
            ctl.peer()  # the replier's forwarder knows ours, and the replier is on it
            await _ready(proc, p.wait)
            loop = asyncio.get_running_loop()
            transport, requests = await loop.create_unix_connection(_Requests, str(socket))
            try:
                return await adrive(rtt_session(p.rtt),
                                    lambda data: requests.roundtrip(data, p.rtt.wait))
            finally:
                transport.close()

    @contextlib.contextmanager
    def forwarder(self, workdir: Path, socket: Path, peer: dict[str, Any] | None
                  ) -> Iterator[tuple[dict[str, Any], subprocess.Popen[str]]]:
        """A forwarder process on ``socket``: its card (what the other one needs) and the
        process, ended on the way out (and by itself if this role dies: its stdin closes)."""
        proc = subprocess.Popen(self.command(workdir, socket, peer), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.name} forwarder exited at start "
                                   f"(status {proc.wait()})")
            yield json.loads(line), proc
        finally:
            proc.kill()
            proc.wait()


async def _ready(proc: subprocess.Popen[str], wait: float) -> None:
    """Waits for the forwarder's "ready" line: it listens on its unix socket."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), wait)
    if line.strip() != "ready":
        raise RuntimeError(f"the forwarder said {line!r}, not 'ready' (status {proc.poll()})")


class FloorC(Floor):
    name = "floor-c"
    about = "forwarders in C (read and write) between minimal uvloop ends: the topology's floor"

    def command(self, workdir: Path, socket: Path, peer: dict[str, Any] | None) -> list[str]:
        binary = workdir / "floor_forward"
        if not binary.exists():
            compiler = shutil.which("cc")
            if compiler is None:
                raise RuntimeError("no C compiler (cc) to build floor_forward.c")
            built = Path(tempfile.mkdtemp(dir=workdir)) / binary.name
            subprocess.run([compiler, "-O2", "-o", str(built), str(SOURCE)], check=True)
            built.replace(binary)  # whole, for the other role
        return [str(binary), str(socket)] + ([] if peer is None else [str(peer["port"])])


class FloorPy(Floor):
    name = "floor-py"
    kind = "py"
    about = "forwarders in Python on uvloop, no protocol: the event loop's floor"


class FloorNode(Floor):
    name = "floor-node"
    kind = "node"
    about = ("forwarders that are embedded Nodes (our tunnel), nothing between their unix "
             "client and the stream: the daemon path without its IPC layers")


FLOOR_C = FloorC()
FLOOR_PY = FloorPy()
FLOOR_NODE = FloorNode()


# --- the forwarders -----------------------------------------------------------------------------


class _Forwarder(asyncio.DatagramProtocol):
    """``floor-py``: a unix client and a UDP peer, each read and each datagram passed on."""

    def __init__(self, peer: tuple[str, int] | None) -> None:
        self.peer = peer  # None: whoever sends the first datagram
        self.client: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.udp = cast(asyncio.DatagramTransport, transport)

    async def start(self, stdin: asyncio.StreamReader) -> None:
        """Nothing to set up: the peer's port came on the command line, or comes with its
        first datagram."""

    async def stop(self) -> None:
        pass

    def client_connected(self, transport: asyncio.WriteTransport) -> None:
        self.client = transport

    def forward(self, data: bytes) -> None:
        if self.peer is not None:
            self.udp.sendto(data, self.peer)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.peer = addr
        if self.client is not None:
            self.client.write(data)


class _NodeForwarder:
    """``floor-node``: the unix client's reads go into one stream of the Node's, and what the
    stream delivers goes back to the client, through no other layer."""

    def __init__(self, node: Node, peer: dict[str, Any] | None) -> None:
        self.node = node
        self.peer = peer  # None: the stream is the first one a request comes on
        self.client: asyncio.WriteTransport | None = None
        self.write: Callable[[bytes], bool] | None = None
        self.pending: list[bytes] = []
        self.stack = contextlib.AsyncExitStack()

    async def start(self, stdin: asyncio.StreamReader) -> None:
        """Trust the other forwarder's Node (the replier's reads its card from stdin), and on
        the replier's side take the port's messages."""
        other = self.peer if self.peer is not None else json.loads(await stdin.readline())
        self.node.trust(other["node_id"])
        self.node.add_peer(other["node_id"], (HOST, other["port"]))
        if self.peer is None:
            self.node.listen(PORT).set_taker(self.take)

    async def stop(self) -> None:
        await self.stack.aclose()

    def client_connected(self, transport: asyncio.WriteTransport) -> None:
        self.client = transport
        if self.peer is not None:
            # Opened once the requester is on: by then the replier's Node trusts ours.
            asyncio.get_running_loop().create_task(self._connect(self.peer["node_id"]))

    async def _connect(self, peer: str) -> None:
        conn = await self.stack.enter_async_context(self.node.connect(peer, PORT))
        conn.set_taker(self.take)
        self.write = conn.write
        for data in self.pending:
            conn.write(data)

    def forward(self, data: bytes) -> None:
        if self.write is None:
            self.pending.append(data)
        else:
            self.write(data)  # in lockstep, a stream never holds enough to say "wait"

    def take(self, message: NodeMessage) -> bool:
        if self.write is None:
            stream = message.way_back
            assert stream is not None
            self.write = stream.write
        assert self.client is not None
        self.client.write(message.data)
        return True


class _Client(asyncio.Protocol):
    """A forwarder's unix client."""

    def __init__(self, forwarder: _Forwarder | _NodeForwarder, gone: asyncio.Event) -> None:
        self.forwarder = forwarder
        self.gone = gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.forwarder.client_connected(cast(asyncio.WriteTransport, transport))

    def data_received(self, data: bytes) -> None:
        self.forwarder.forward(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone.set()


async def forward(kind: str, home: str, socket: str, peer: dict[str, Any] | None) -> None:
    """A forwarder process: prints its card and "ready", serves one client on ``socket`` until
    it hangs up or stdin closes."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    gone = asyncio.Event()

    async def serve(forwarder: _Forwarder | _NodeForwarder, card: dict[str, Any]) -> None:
        print(json.dumps(card), flush=True)
        await forwarder.start(stdin)
        server = await loop.create_unix_server(lambda: _Client(forwarder, gone), socket)
        print("ready", flush=True)
        eof = loop.create_task(stdin.read())  # the role that started us is gone
        hangup = loop.create_task(gone.wait())
        await asyncio.wait((eof, hangup), return_when=asyncio.FIRST_COMPLETED)
        for task in (eof, hangup):
            task.cancel()
        server.close()
        await forwarder.stop()

    if kind == "py":
        udp, forwarder = await loop.create_datagram_endpoint(
            lambda: _Forwarder(None if peer is None else (HOST, peer["port"])),
            local_addr=(HOST, 0))
        try:
            await serve(forwarder, {"port": udp.get_extra_info("sockname")[1]})
        finally:
            udp.close()
        return
    async with Node(home=home, listen=f"{HOST}:0") as node:
        await serve(_NodeForwarder(node, peer),
                    {"node_id": node.node_id, "port": node.local_endpoint[1]})


if __name__ == "__main__":
    # KIND HOME SOCKET [PEER_CARD]: the forwarder of Floor.command
    pilot_agents.run(forward(sys.argv[1], sys.argv[2], sys.argv[3],
                             json.loads(sys.argv[4]) if len(sys.argv) > 4 else None))
