"""The daemon: one Node per home, its trust store, and the local ZeroMQ API (``docs/ipc.md``).

- ``options``: :class:`DaemonOptions`, every setting and bound;
- ``requests``: the IPC requests as strict pydantic models (the machine-readable docs/ipc.md);
- ``server``: the ZeroMQ sockets and serve loop; ``dispatch``: request type -> handler;
- ``messaging``, ``trust_commands``, ``admin``: the commands, by concern; ``context``: what
  they share (the Node, the trust store, static peers, naming);
- ``inbox``: messages waiting for clients; ``spool``: those kept across a restart;
  ``service``: :class:`Daemon`, the wiring;
- ``process``: lock, pid file, logging, foreground run, detached start, stop.
"""

from __future__ import annotations

from ..ipc import decode_data
from .options import DaemonOptions
from .process import process_alive, run_foreground, start_detached, stop
from .requests import COMMANDS
from .service import Daemon

__all__ = [
    "COMMANDS", "Daemon", "DaemonOptions", "decode_data", "process_alive", "run_foreground",
    "start_detached", "stop",
]
