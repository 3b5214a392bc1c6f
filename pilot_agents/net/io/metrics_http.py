"""An HTTP endpoint on the event loop for Prometheus to scrape: ``GET /metrics``.

The beacon and the daemon serve their metrics through it (``--metrics HOST:PORT``). It runs on
the loop that owns the counters it reports, so a scrape reads them between two callbacks, never
while they change (prometheus_client's own server runs in a thread, which would race the loop on
every dict it reads). One request per connection; the request head, the time a client may take
and the connections open at once are bounded, so a client that stalls or floods costs little.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from ...addressing import HostPort, parse_host_port
from ...errors import ConfigError

log = logging.getLogger("pilot_agents.metrics")

MAX_HEAD: Final = 8192  # bytes of request line and headers
CLIENT_TIMEOUT: Final = 5.0  # seconds a client may take to send its request or read the answer
MAX_CONNECTIONS: Final = 16  # open at once; more are closed unanswered


class MetricsServer:
    """Answers ``GET /metrics`` (and ``GET /``) with ``render()``; ``close()`` stops it."""

    def __init__(self, render: Callable[[], bytes], content_type: str) -> None:
        self._render = render
        self._content_type = content_type
        self._server: asyncio.Server | None = None
        self._open = 0
        self.scrapes = 0

    @property
    def address(self) -> HostPort:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self, listen: str) -> None:
        """ConfigError if ``listen`` is not HOST:PORT or can't be bound."""
        try:
            host, port = parse_host_port(listen)
        except ConfigError as exc:
            raise ConfigError(f"--metrics: {exc}") from None
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        except OSError as exc:
            raise ConfigError(f"--metrics: cannot listen on {listen}: {exc.strerror}") from None
        log.info("metrics on http://%s:%d/metrics", *self.address)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(self._answer(head.split(b"\r\n", 1)[0]))
            async with asyncio.timeout(CLIENT_TIMEOUT):
                await writer.drain()
        except (
            TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError
        ):
            pass  # the client went away, stalled or sent too much: nothing to answer
        finally:
            self._open -= 1
            writer.close()

    def _answer(self, request_line: bytes) -> bytes:
        parts = request_line.split()
        if len(parts) != 3 or parts[0] != b"GET":
            return _response(b"405 Method Not Allowed", b"text/plain", b"GET /metrics\n")
        if parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            return _response(b"404 Not Found", b"text/plain", b"GET /metrics\n")
        try:
            body = self._render()
        except Exception:  # a bug in a collector must not take the process down
            log.exception("rendering the metrics failed")
            return _response(b"500 Internal Server Error", b"text/plain", b"see the log\n")
        self.scrapes += 1
        return _response(b"200 OK", self._content_type.encode(), body)


def _response(status: bytes, content_type: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (status, content_type, len(body), body)
    )


async def serve_metrics(
    listen: str, render: Callable[[], bytes], content_type: str
) -> MetricsServer:
    """A started :class:`MetricsServer` on ``listen`` (HOST:PORT; port 0 takes a free one)."""
    server = MetricsServer(render, content_type)
    await server.start(listen)
    return server
