"""nats-py request/reply through a real ``nats-server`` (the Debian package), which the server
role starts on a free loopback port and stops at the end: three processes per round trip.

Unavailable (ImportError) without the ``nats-py`` package or a ``nats-server`` on the PATH.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nats

from benchmarks.harness import (
    HOST,
    Case,
    Control,
    Kind,
    Params,
    Result,
    adrive,
    client_session,
    server_plan,
)

SERVER = shutil.which("nats-server")
if SERVER is None:
    raise ImportError("no nats-server on the PATH (apt-get install nats-server)")

SUBJECT = "bench"
MAX_PAYLOAD = 64 * 2**20
"""nats-server's largest message (its default is 1 MiB): room for the bulk message."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def nats_server(wait: float) -> Iterator[str]:
    """A nats-server on loopback for this block; its URL."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bench-nats-") as tmp:
        config = Path(tmp) / "nats.conf"
        config.write_text(f"listen: {HOST}:{port}\nmax_payload: {MAX_PAYLOAD}\n")
        assert SERVER is not None
        proc = subprocess.Popen([SERVER, "-c", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + wait
            while True:
                with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.1):
                    break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("nats-server did not start")
                time.sleep(0.02)
            yield f"nats://{HOST}:{port}"
        finally:
            proc.terminate()
            proc.wait(wait)


class Nats(Case):
    name = "nats"
    about = "nats-py request/reply through a local nats-server (three processes)"

    async def server(self, ctl: Control, p: Params, kind: Kind) -> None:
        plan = server_plan(kind, p)
        with nats_server(p.wait) as url:
            nc = await nats.connect(url)
            try:
                sub = await nc.subscribe(SUBJECT)
                await nc.flush()
                ctl.publish(url=url)
                for responder in plan:
                    msg = await sub.next_msg(timeout=p.timeout(kind))
                    responder.feed(msg.data)
                    await msg.respond(responder.finish())
                await ctl.await_stop()
            finally:
                await nc.close()

    async def client(self, ctl: Control, p: Params, kind: Kind) -> Result:
        nc = await nats.connect(ctl.peer()["url"])
        try:

            async def roundtrip(request: bytes) -> bytes:
                reply = await nc.request(SUBJECT, request, timeout=p.timeout(kind))
                data: bytes = reply.data  # typed here too when nats-py is not installed
                return data

            return await adrive(client_session(kind, p), roundtrip)
        finally:
            await nc.close()


CASE = Nats()
