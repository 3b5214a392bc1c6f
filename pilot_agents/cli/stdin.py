"""Reading stdin line by line from a command's event loop, in ``connect`` (netcat mode),
``push --stdin`` and ``mcp connect``.

A pipe or a socket is watched by the loop itself. A terminal is not: the loop would make it
non-blocking, and that flag belongs to the terminal, shared with the shell, which would find it
so after we exit. Nor is a file or /dev/null (uvloop aborts the process if asked to watch one).
Those are read in a thread, from the descriptor itself: a thread blocked reading through
``sys.stdin``'s buffer would hold its lock at exit, and the interpreter aborts on that ("could
not acquire lock for <_io.BufferedReader name='<stdin>'> at interpreter shutdown") when Ctrl-C
ends a command whose stdin is idle.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import threading
from collections.abc import Awaitable, Callable

from ..errors import ConfigError

CHUNK = 65536  # bytes a thread's read takes at once
AHEAD = 4  # chunks a thread reads ahead of the lines taken


async def stdin_lines(limit: int, what: str) -> Callable[[], Awaitable[bytes]]:
    """What reads stdin's next line, with its newline (b"" at its end); a line of more than
    ``limit`` bytes raises ConfigError naming it ``what`` (a message, an item)."""
    too_long = ConfigError(f"{what} of more than {limit} bytes on stdin (one per line)")
    mode = os.fstat(sys.stdin.fileno()).st_mode
    if (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) and not sys.stdin.isatty():
        reader = asyncio.StreamReader(limit=limit)
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def from_pipe() -> bytes:
            try:
                return await reader.readline()
            except ValueError:  # the limit
                raise too_long from None

        return from_pipe
    return _ThreadLines(sys.stdin.fileno(), limit, too_long).readline


class _ThreadLines:
    """Lines of ``fd`` read by a daemon thread (it never holds up the exit), at most AHEAD
    chunks ahead of the lines taken."""

    def __init__(self, fd: int, limit: int, too_long: ConfigError) -> None:
        self._limit = limit
        self._too_long = too_long
        self._buffer = bytearray()
        self._scanned = 0
        self._ended = False
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self._room = threading.Semaphore(AHEAD)  # chunks read and not yet taken: AHEAD at most
        loop = asyncio.get_running_loop()

        def read() -> None:
            while True:
                self._room.acquire()
                try:
                    chunk = os.read(fd, CHUNK)
                except OSError:
                    chunk = b""
                try:
                    loop.call_soon_threadsafe(self._chunks.put_nowait, chunk)
                except RuntimeError:  # the loop is closed: the command is over
                    return
                if not chunk:
                    return

        threading.Thread(target=read, name="stdin", daemon=True).start()

    async def readline(self) -> bytes:
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", self._scanned) + 1
            if end or (self._ended and buffer):
                end = end or len(buffer)
                if end > self._limit:
                    raise self._too_long
                line = bytes(buffer[:end])
                del buffer[:end]
                self._scanned = 0
                return line
            if self._ended:
                return b""
            if len(buffer) > self._limit:
                raise self._too_long
            self._scanned = len(buffer)  # no newline before here: not searched again
            chunk = await self._chunks.get()
            self._room.release()
            if chunk:
                buffer += chunk
            else:
                self._ended = True
