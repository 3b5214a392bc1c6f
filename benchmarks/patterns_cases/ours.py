"""pilot-agents' patterns (``patterns.pubsub``, ``patterns.reqrep``), on an embedded Node in each
role's process (``EMBEDDED``), or through a daemon of each role's own (``DAEMON``: SDK → daemon →
tunnel → daemon → SDK).

The daemon is the role process's child (``python -m pilot_agents.daemon``, as ``daemon start``
runs it), started before the measurement and stopped and waited for after it, so the CPU it used
is counted as the benchmark's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import pilot_agents
from benchmarks.harness import HOST, Control, RttResult, adrive, rtt_session
from benchmarks.pattern_harness import (
    TOPIC_PREFIX,
    Item,
    PatternCase,
    PatternParams,
    PubResult,
    SubResult,
    apublish_all,
    subscriber_session,
)
from pilot_agents import Node
from pilot_agents.daemon import DaemonOptions
from pilot_agents.errors import DaemonNotRunningError, PilotTimeoutError
from pilot_agents.net.tunnel import session
from pilot_agents.patterns import Publisher, Request, Requester, Subscriber, serving
from pilot_agents.sdk import Client
from pilot_agents.transport import Transport

CORE = "compiled core" if not session.__file__.endswith(".py") else "pure-Python core"
PORT = 2001
"""The virtual port the publisher and the replier listen on."""
R = TypeVar("R")


class Side(ABC):
    """One role's pilot-agents endpoint: a transport, what the other roles need to reach it
    (its card), and how it gets to trust and reach theirs."""

    def __init__(self, p: PatternParams, role: str) -> None:
        self.home = Path(p.workdir) / role
        self.wait = p.wait

    @property
    @abstractmethod
    def transport(self) -> Transport: ...

    @abstractmethod
    def card(self) -> dict[str, Any]: ...

    @abstractmethod
    async def meet(self, card: dict[str, Any]) -> None: ...

    @abstractmethod
    async def __aenter__(self) -> Side: ...

    @abstractmethod
    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None: ...


class EmbeddedSide(Side):
    def __init__(self, p: PatternParams, role: str) -> None:
        super().__init__(p, role)
        self.node = Node(home=str(self.home), listen=f"{HOST}:0")

    @property
    def transport(self) -> Transport:
        return self.node

    def card(self) -> dict[str, Any]:
        return {"node_id": self.node.node_id, "port": self.node.local_endpoint[1]}

    async def meet(self, card: dict[str, Any]) -> None:
        self.node.trust(card["node_id"])
        self.node.add_peer(card["node_id"], (HOST, card["port"]))

    async def __aenter__(self) -> EmbeddedSide:
        await self.node.__aenter__()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.node.__aexit__(kind, exc, tb)


class DaemonSide(Side):
    def __init__(self, p: PatternParams, role: str) -> None:
        super().__init__(p, role)
        self.client = Client(self.home)
        self.info: dict[str, Any] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def transport(self) -> Transport:
        return self.client

    def card(self) -> dict[str, Any]:
        return {"node_id": self.info["node_id"], "address": self.info["endpoints"][0]}

    async def meet(self, card: dict[str, Any]) -> None:
        await self.client.add_peer(card["node_id"], card["address"])
        await self.client.trust_add(card["node_id"])

    async def __aenter__(self) -> DaemonSide:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        options = DaemonOptions(home=self.home, listen=f"{HOST}:0", inbox_ports=())
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pilot_agents.daemon", "--ready-fd", str(write_fd),
                 "--options", options.to_json()],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(write_fd,))
            os.close(write_fd)
            self.info = _ready_info(read_fd, self.wait)
        finally:
            os.close(read_fd)
        await self.client.__aenter__()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        proc, self.proc = self.proc, None
        try:
            with contextlib.suppress(DaemonNotRunningError):  # gone before it could answer
                await self.client.call("stop")
        finally:
            await self.client.close()
            if proc is not None:
                await asyncio.to_thread(_end, proc, self.wait)


def _ready_info(fd: int, wait: float) -> dict[str, Any]:
    """The daemon's info, from the line it writes to ``fd`` once it is ready."""
    deadline = time.monotonic() + wait
    line = b""
    while not line.endswith(b"\n"):
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError(f"the daemon was not ready within {wait} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError(f"the daemon exited during start: {line!r}")
        line += chunk
    reply = json.loads(line)
    if not reply.get("ok"):
        raise RuntimeError(f"the daemon failed to start: {reply}")
    info: dict[str, Any] = reply["info"]
    return info


def _end(proc: subprocess.Popen[bytes], wait: float) -> None:
    """Wait for the stopped daemon (which counts its CPU time as ours), killing it if it lingers."""
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def echo(request: Request) -> bytes:
    return request.data


class Ours(PatternCase):
    """The patterns over the transport of :attr:`side`, on uvloop (``pilot_agents.run``), as
    an application and the daemon run."""

    side: ClassVar[type[Side]]

    def run_async(self, main: Coroutine[Any, Any, R]) -> R:
        return pilot_agents.run(main)

    async def publisher(self, ctl: Control, p: PatternParams, subscribers: int,
                        messages: int) -> PubResult:
        async with self.side(p, "pub") as side:
            for _ in range(subscribers):
                await side.meet(ctl.peer())
            async with Publisher(side.transport, PORT) as pub:
                ctl.publish(**side.card())

                return await apublish_all(ctl, p, subscribers, messages, pub.publish)

    async def subscriber(self, ctl: Control, p: PatternParams, messages: int,
                         index: int) -> SubResult:
        async with self.side(p, f"sub{index}") as side:
            ctl.publish(**side.card())
            card = ctl.peer()
            await side.meet(card)
            async with Subscriber(side.transport, card["node_id"], PORT, [TOPIC_PREFIX]) as sub:

                async def step(timeout: float) -> Item | None:
                    try:
                        publication = await sub.receive(timeout)
                    except PilotTimeoutError:
                        return None
                    return publication.topic, publication.data

                return await adrive(subscriber_session(ctl, p, messages), step)

    async def replier(self, ctl: Control, p: PatternParams) -> None:
        async with self.side(p, "rep") as side:
            await side.meet(ctl.peer())
            async with serving(side.transport, PORT, echo):
                ctl.publish(**side.card())
                await ctl.await_stop(p.deadline)

    async def requester(self, ctl: Control, p: PatternParams) -> RttResult:
        async with self.side(p, "req") as side:
            ctl.publish(**side.card())
            card = ctl.peer()
            await side.meet(card)
            async with Requester(side.transport) as requester:

                async def roundtrip(data: bytes) -> bytes:
                    reply = await requester.request(card["node_id"], PORT, data,
                                                    timeout=p.rtt.wait)
                    return reply.data

                return await adrive(rtt_session(p.rtt), roundtrip)


class Embedded(Ours):
    name = "embedded"
    about = f"pilot_agents.Node in each role's process; uvloop; {CORE}"
    side = EmbeddedSide


class Daemon(Ours):
    name = "daemon"
    about = f"sdk.Client → its own daemon → tunnel → daemon → sdk.Client; uvloop; {CORE}"
    side = DaemonSide


EMBEDDED = Embedded()
DAEMON = Daemon()
