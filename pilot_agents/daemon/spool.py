"""Port messages no client had read when the daemon stopped, kept in the home for the next start
(``<home>/unread.jsonl``, 0600): the tunnel acknowledged them to their senders already."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

from ..home import read_private_text, write_private
from ..node.connection import Message

log = logging.getLogger("pilot_agents.daemon")

UNREAD_FILE = "unread.jsonl"


def save_unread(home: Path, messages: list[Message]) -> None:
    write_private(home / UNREAD_FILE, "".join(
        json.dumps({"port": m.port, "from": m.sender, "source_port": m.source_port,
                    "data": base64.b64encode(m.data).decode()}) + "\n"
        for m in messages))
    log.info("kept %d unread messages in %s for the next start", len(messages), UNREAD_FILE)


def take_unread(home: Path) -> list[Message]:
    """The messages a previous daemon kept, oldest first; the file is gone afterwards."""
    path = home / UNREAD_FILE
    try:
        # Checked as every file of the home: a planted one could forge messages from a peer.
        lines = read_private_text(path).splitlines()
    except FileNotFoundError:
        return []
    messages = []
    for line in lines:
        try:
            record = json.loads(line)
            messages.append(Message(base64.b64decode(record["data"]), str(record["from"]),
                                    int(record["port"]), int(record["source_port"])))
        except (ValueError, KeyError, TypeError):
            log.warning("skipped a damaged line in %s", path)
    path.unlink()
    log.info("restored %d unread messages from %s", len(messages), UNREAD_FILE)
    return messages
