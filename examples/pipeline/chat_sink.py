"""The example's "chat" sink: an incoming webhook (the request Slack's accepts: a JSON object
with "text", POSTed) that appends each message to a JSON-lines file.

    python chat_sink.py PORT FILE
"""

from __future__ import annotations

import contextlib
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_BYTES = 1 << 20  # one message


class Webhook(BaseHTTPRequestHandler):
    channel: Path

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        try:
            if size > MAX_BYTES:
                raise ValueError(f"over {MAX_BYTES} bytes")
            message = json.loads(self.rfile.read(size))
            if not isinstance(message, dict) or not isinstance(message.get("text"), str):
                raise ValueError('not {"text": ...}')
        except ValueError as exc:
            self.send_error(400, str(exc))
            return
        with self.channel.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"path": self.path, **message}) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_GET(self) -> None:
        """The readiness check."""
        self.send_response(204)
        self.end_headers()


if __name__ == "__main__":
    Webhook.channel = Path(sys.argv[2])
    with ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Webhook) as httpd, \
            contextlib.suppress(KeyboardInterrupt):  # run's stop
        httpd.serve_forever()
