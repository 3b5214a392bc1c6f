"""Ending a data socket's connection without losing its last frame."""

from __future__ import annotations

import asyncio

# Seconds a client has to close its side once ours is closed; then the connection is cut.
LINGER = 10.0


def hang_up(transport: asyncio.Transport) -> None:
    """Close our side of the connection once what was written is out, and read (and drop) what
    the client writes until it closes its own. Closing both sides at once would make a client
    that writes meanwhile (a reply, a close) fail with EPIPE, and asyncio then drops what it
    had not read yet: our last frame, the one that says why."""
    if transport.is_closing():
        return
    if not transport.can_write_eof():
        transport.close()
        return
    transport.write_eof()
    transport.resume_reading()
    asyncio.get_running_loop().call_later(LINGER, transport.abort)
