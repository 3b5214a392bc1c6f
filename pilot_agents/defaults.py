"""Defaults shared by the command line, the SDK and the daemon, each defined once here."""

from __future__ import annotations

DEFAULT_PORT = 1001
"""The port a connection goes to, and the daemon's inbox listens on, when none is named."""
