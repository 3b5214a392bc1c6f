"""A stdio MCP server with one tool, ``post_message``: it posts ``{"text": ...}`` to the incoming
webhook at ``$WEBHOOK_URL``, the request Slack, Mattermost, Rocket.Chat and Discord (``/slack``)
incoming webhooks accept. The example points it at its local chat sink; in production,
``WEBHOOK_URL`` is the chat's real webhook (or a maintained Slack MCP server replaces this one).

It is the example's own, the smallest honest option: the chat MCP servers on PyPI all need
their chat's own server, which an offline example cannot start.

    WEBHOOK_URL=http://127.0.0.1:PORT/hooks/sales python chat_webhook_mcp.py
"""

from __future__ import annotations

import json
import os
import urllib.request

from mcp.server import MCPServer

server = MCPServer("chat-webhook")
TIMEOUT = 10.0  # seconds for the webhook to answer


@server.tool(description="Post a message to the team's chat channel (an incoming webhook).")
def post_message(text: str) -> str:
    request = urllib.request.Request(
        os.environ["WEBHOOK_URL"], data=json.dumps({"text": text}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
        return f"posted ({answer.status})"


if __name__ == "__main__":
    server.run("stdio")
