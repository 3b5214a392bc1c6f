"""Port messages no client had read when the daemon stopped, kept in the home for the next start
(``<home>/unread.jsonl``, 0600): the tunnel acknowledged them to their senders already."""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..home import read_private_text, write_private
from ..node.connection import Message

log = logging.getLogger("pilot_agents.daemon")

UNREAD_FILE = "unread.jsonl"
DAMAGED_FILE = UNREAD_FILE + ".damaged"  # what could not be read back, kept for a human


def save_unread(home: Path, messages: list[Message]) -> None:
    write_private(home / UNREAD_FILE, "".join(
        json.dumps({"port": m.port, "from": m.sender, "source_port": m.source_port,
                    "data": base64.b64encode(m.data).decode()}) + "\n"
        for m in messages))
    log.info("kept %d unread messages in %s for the next start", len(messages), UNREAD_FILE)


def take_unread(home: Path) -> list[Message]:
    """The messages a previous daemon kept, oldest first; the file is gone afterwards. What
    can't be read back (a file that is not UTF-8 text, records that are not messages) is
    logged and kept aside in ``unread.jsonl.damaged``, and the rest restored: a damaged file
    never stops a start."""
    path = home / UNREAD_FILE
    damaged = home / DAMAGED_FILE
    try:
        # Checked as every file of the home: a planted one could forge messages from a peer.
        lines = read_private_text(path).splitlines(keepends=True)
    except FileNotFoundError:
        return []
    except UnicodeDecodeError as exc:
        os.replace(path, damaged)
        log.warning("%s is damaged (not UTF-8 text: %s): moved aside to %s, none of its "
                    "messages restored", UNREAD_FILE, exc.reason, DAMAGED_FILE)
        return []
    messages, bad = [], []
    for number, line in enumerate(lines, 1):
        try:
            messages.append(_message(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("skipped record %d of %s, not a message: %s", number, UNREAD_FILE,
                        str(exc) or type(exc).__name__)
            bad.append(line)
    if bad:
        write_private(damaged, "".join(bad))
        log.warning("kept the %d skipped record(s) of %s in %s", len(bad), UNREAD_FILE,
                    DAMAGED_FILE)
    path.unlink()
    log.info("restored %d unread messages from %s", len(messages), UNREAD_FILE)
    return messages


def _message(record: Any) -> Message:
    """The message a record of the file stands for; ValueError, KeyError or TypeError if it
    is not one (a field missing, of the wrong type, or out of range)."""
    port, source_port, sender, data = (record["port"], record["source_port"], record["from"],
                                       record["data"])
    if not (type(port) is int and 1 <= port <= 65535):
        raise ValueError(f"port {port!r} is not in 1..65535")
    if not (type(source_port) is int and 0 <= source_port <= 65535):
        raise ValueError(f"source port {source_port!r} is not in 0..65535")
    if not isinstance(sender, str) or not sender:
        raise ValueError(f"sender {sender!r} is not a node id")
    if not isinstance(data, str):
        raise ValueError("data is not base64 text")
    return Message(base64.b64decode(data, validate=True), sender, port, source_port)
