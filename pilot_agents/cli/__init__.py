"""The ``pilotctl`` / ``pilot-agents`` command line.

Every command but ``daemon start --foreground`` and ``beacon`` talks to the daemon of the home
(``--home``, else ``PILOT_HOME``, else ``~/.pilot-agents``) over its local ZeroMQ API. Every user
mistake ends as one line on stderr and a distinct exit code (see ``EXIT_CODES``); an unexpected
exception (a bug) prints one line too, and its traceback with ``PILOT_DEBUG=1``.

How it is built, so that a new command group is one new module:

- :mod:`.app` holds ``main`` and ``GROUPS``, the table of command groups in help order. It
  parses the line, calls the handler argparse picked, and turns whatever the handler raised into
  the exit status.
- :mod:`.parser` builds argparse's tree. A group module offers ``register(commands)``, which adds
  its commands through :class:`.parser.Commands`, each with its handler; the argument types
  (``port``, ``positive``, ...) live there too.
- :mod:`.context`: a handler is ``handler(ctx) -> exit status``; the :class:`.context.Context`
  carries the parsed arguments, the home, the ``--json`` flag, and the daemon: ``ctx.call(cmd,
  **fields)`` for one request, ``ctx.run(body)`` for a coroutine that holds a client.
- :mod:`.output`: human and JSON output helpers, ``EXIT_CODES`` and the error -> exit status
  mapping, reported in one line on stderr.
- The groups: :mod:`.daemon` (start/stop/status), :mod:`.trust`, :mod:`.messaging`
  (connect/send/listen/unlisten), :mod:`.patterns` (request/serve/publish/subscribe/publishers/
  unpublish: the message-bus patterns), :mod:`.pushpull` (push/pull), :mod:`.diagnostics`
  (ping/peers/info/resolve/add-peer), :mod:`.beacon` (hands its arguments to the beacon
  server's own parser), :mod:`.pipeline`.

To add a group (the bus verbs, ``mcp``, pipelines): write ``cli/<group>.py`` with ``register``
and one handler per command, using only ``context``, ``output`` and ``parser``; add its
``register`` to ``GROUPS``. No other module changes.
"""

from __future__ import annotations

from .app import build_parser, main
from .output import EXIT_CODES, exit_code

__all__ = ["EXIT_CODES", "build_parser", "exit_code", "main"]
