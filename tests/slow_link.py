"""A slow link between two UDP endpoints on 127.0.0.1, for tests that need a transfer to take
seconds: a forwarder that passes at most ``rate`` bytes a second each way and drops what its
bounded queue cannot hold, as a bottleneck router does.

``a`` sends to :attr:`SlowLink.toward_b` instead of to ``b``; ``b`` sees the packets come from
:attr:`SlowLink.toward_a` and answers there, and the link passes the answers on to ``a``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

QUEUE_BYTES = 256 * 1024


class _Direction(asyncio.DatagramProtocol):
    """One socket's way in, and the paced way out through the other socket."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.ready = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None
        self.source: tuple[str, int] | None = None  # who sends into this socket
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.source = addr
        if self.queued + len(data) > QUEUE_BYTES:
            self.dropped += 1
            return
        self.queue.append(data)
        self.queued += len(data)
        self.ready.set()

    async def pump(self, out: _Direction, to: tuple[str, int] | None) -> None:
        """Send what arrives here out of ``out``'s socket to ``to`` (None: whoever last sent
        into ``out``), no faster than the rate."""
        loop = asyncio.get_running_loop()
        free_at = loop.time()
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.queue:
                data = self.queue.popleft()
                self.queued -= len(data)
                free_at = max(free_at, loop.time()) + len(data) / self.rate
                await asyncio.sleep(free_at - loop.time())
                target = to or out.source
                if target is not None and out.transport is not None:
                    out.transport.sendto(data, target)


class SlowLink:
    def __init__(self, b: tuple[str, int], rate: float) -> None:
        self._b = b
        self._rate = rate
        self._tasks: list[asyncio.Task[None]] = []
        self._toward_b = _Direction(rate)  # a's packets, for b
        self._toward_a = _Direction(rate)  # b's answers, for a

    @property
    def toward_b(self) -> str:
        """Where ``a`` sends what is meant for ``b``."""
        return self._address(self._toward_b)

    @property
    def toward_a(self) -> str:
        """Where ``b`` sees ``a``'s packets come from."""
        return self._address(self._toward_a)

    @staticmethod
    def _address(direction: _Direction) -> str:
        assert direction.transport is not None
        host, port = direction.transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for direction in (self._toward_b, self._toward_a):
            await loop.create_datagram_endpoint(lambda d=direction: d,  # type: ignore[misc]
                                                local_addr=("127.0.0.1", 0))
        self._tasks = [
            asyncio.create_task(self._toward_b.pump(self._toward_a, self._b)),
            asyncio.create_task(self._toward_a.pump(self._toward_b, None)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for direction in (self._toward_b, self._toward_a):
            if direction.transport is not None:
                direction.transport.close()


@contextlib.asynccontextmanager
async def slow_link(b: tuple[str, int], rate: float) -> AsyncIterator[SlowLink]:
    link = SlowLink(b, rate)
    await link.start()
    try:
        yield link
    finally:
        await link.stop()
