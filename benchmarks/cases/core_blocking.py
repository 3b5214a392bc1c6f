"""The tunnel's protocol core (Mux and Session: the same handshake, encryption, reliability and
packets as the ``tunnel`` case) driven by blocking sockets, without asyncio and without the Node
API. Not an API pilot-agents offers: a measurement of what the protocol costs by itself, beside
the ``tunnel`` row, which adds the event loop and the embedded API on top.

The driver is the smallest loop a sans-IO core needs: send what is due, hand over events, then
wait in ``select`` for a datagram or the core's next deadline.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from benchmarks.cases.tunnel import CORE, SERVICE_PORT
from benchmarks.harness import (
    HOST,
    Case,
    Control,
    Kind,
    Params,
    Result,
    client_session,
    drive,
    server_plan,
)
from pilot_agents.identity import Identity
from pilot_agents.net.io.udp import open_socket, read_batch
from pilot_agents.net.tunnel import events
from pilot_agents.net.tunnel.mux import Mux
from pilot_agents.net.tunnel.session import Session

E = TypeVar("E")
CLIENT_PORT = 50000
"""The virtual source port of the client's stream."""


class BlockingDriver:
    """One UDP socket and one :class:`Mux`, advanced only inside :meth:`until`."""

    def __init__(self, identity: Identity) -> None:
        self.mux = Mux(identity.secret_key, identity.public_key)
        self.sock = open_socket(HOST, 0)
        self.port: int = self.sock.getsockname()[1]

    def flush(self) -> None:
        for data, address in self.mux.datagrams_to_send(time.monotonic()):
            if isinstance(address, tuple):
                self.sock.sendto(data, address)

    def until(self, want: Callable[[events.Event], E | None], timeout: float) -> E:
        """Runs the core until ``want`` returns something for one of its events."""
        mux = self.mux
        deadline = time.monotonic() + timeout
        while True:
            self.flush()
            event = mux.next_event()
            while event is not None:
                found = want(event)
                if found is not None:
                    return found
                event = mux.next_event()
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"nothing wanted arrived within {timeout} s")
            timer = mux.get_timer()
            wake = deadline if timer is None else min(timer, deadline)
            if select.select([self.sock], [], [], max(wake - now, 0.0))[0]:
                now = time.monotonic()
                for data, address in read_batch(self.sock):
                    mux.receive_datagram(data, address, now)
            now = time.monotonic()
            timer = mux.get_timer()
            if timer is not None and now >= timer:
                mux.handle_timer(now)

    def message(self, timeout: float) -> events.MessageReceived:
        received = self.until(_message, timeout)
        session = self.mux.get_session(received.peer)
        assert session is not None
        session.message_consumed(received.stream_id, len(received.data))
        return received

    def close(self) -> None:
        self.sock.close()


def _message(event: events.Event) -> events.MessageReceived | None:
    return event if isinstance(event, events.MessageReceived) else None


class CoreBlocking(Case):
    name = "core-blocking"
    about = f"the tunnel's sans-IO core on blocking sockets: no asyncio, no Node API; {CORE}"

    def server(self, ctl: Control, p: Params, kind: Kind) -> None:
        plan = server_plan(kind, p)
        driver = BlockingDriver(_identity(p, "server"))
        try:
            client = bytes.fromhex(ctl.peer()["key"])
            driver.mux.trust(client)
            ctl.publish(key=driver.mux.public_key.hex(), port=driver.port)
            for responder in plan:
                request = driver.message(p.timeout(kind))
                responder.feed(request.data)
                session = driver.mux.get_session(request.peer)
                assert session is not None
                session.send_message(request.stream_id, responder.finish())
            driver.flush()  # the last reply
            ctl.wait_stop()
        finally:
            driver.close()

    def client(self, ctl: Control, p: Params, kind: Kind) -> Result:
        driver = BlockingDriver(_identity(p, "client"))
        try:
            ctl.publish(key=driver.mux.public_key.hex())
            server = ctl.peer()
            key = bytes.fromhex(server["key"])
            driver.mux.trust(key)
            session: Session = driver.mux.session(key, time.monotonic())
            session.address = (HOST, server["port"])
            stream = session.open_stream(CLIENT_PORT, SERVICE_PORT)
            session.connect(time.monotonic())

            def roundtrip(request: bytes) -> bytes:
                session.send_message(stream, request)
                return driver.message(p.timeout(kind)).data

            return drive(client_session(kind, p), roundtrip)
        finally:
            driver.close()


def _identity(p: Params, role: str) -> Identity:
    return Identity.load_or_create(Path(p.workdir) / f"core-blocking-{role}")


CASE = CoreBlocking()
