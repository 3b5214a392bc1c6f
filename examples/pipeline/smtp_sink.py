"""The example's "email" sink: a local SMTP server (aiosmtpd) that accepts any login and stores
each message in a Maildir. In production the reporter's email MCP server points at a real mail
server instead; this stands in for it offline.

    python smtp_sink.py PORT MAILDIR
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import AuthResult


def accept_any_login(*args: Any) -> AuthResult:
    """The email MCP server always logs in; a local sink has nobody to keep out (it listens on
    127.0.0.1 only)."""
    return AuthResult(success=True)


async def main(port: int, maildir: str) -> None:
    controller = Controller(Mailbox(Path(maildir)), hostname="127.0.0.1", port=port,
                            authenticator=accept_any_login, auth_require_tls=False)
    controller.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"smtp sink on 127.0.0.1:{port}, mail in {maildir}", file=sys.stderr, flush=True)
    await stop.wait()
    controller.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
