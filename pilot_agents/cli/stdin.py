"""Reading stdin line by line from a command's event loop, in ``connect`` (netcat mode),
``push --stdin`` and ``mcp connect``.

A pipe, a socket or a terminal is watched by the loop itself. A thread blocked reading one
would hold stdin's buffer lock at exit, and the interpreter aborts on it ("could not acquire
lock for <_io.BufferedReader name='<stdin>'> at interpreter shutdown") when Ctrl-C ends a
command whose stdin is idle. A file or /dev/null, which the loop cannot watch (uvloop aborts the
process if asked to), is read in a thread: such a read never waits.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import Awaitable, Callable

from ..errors import ConfigError


async def stdin_lines(limit: int, what: str) -> Callable[[], Awaitable[bytes]]:
    """What reads stdin's next line, with its newline (b"" at its end); a line of more than
    ``limit`` bytes raises ConfigError naming it ``what`` (a message, an item)."""
    mode = os.fstat(sys.stdin.fileno()).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or sys.stdin.isatty():
        reader = asyncio.StreamReader(limit=limit)
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def from_pipe() -> bytes:
            try:
                return await reader.readline()
            except ValueError:  # the limit
                raise _too_long(limit, what) from None

        return from_pipe

    async def from_file() -> bytes:
        line: bytes = await asyncio.to_thread(sys.stdin.buffer.readline, limit + 1)
        if len(line) > limit and not line.endswith(b"\n"):
            raise _too_long(limit, what)
        return line

    return from_file


def _too_long(limit: int, what: str) -> ConfigError:
    return ConfigError(f"{what} of more than {limit} bytes on stdin (one per line)")
