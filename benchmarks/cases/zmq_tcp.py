"""pyzmq REQ/REP over tcp://127.0.0.1; bulk is one 64 MB message sent zero-copy."""

from __future__ import annotations

from typing import Any

import zmq

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


class ZmqTcp(Case):
    name = "zmq-tcp"
    about = "REQ/REP; bulk = one message"

    def server(self, ctl: Control, p: Params, kind: Kind) -> None:
        plan = server_plan(kind, p)
        with zmq.Context() as context, context.socket(zmq.REP) as sock:
            limit(sock, p.timeout(kind))
            ctl.publish(port=sock.bind_to_random_port(f"tcp://{HOST}"))
            for responder in plan:
                frame = sock.recv(copy=False)
                responder.feed(frame.buffer)
                sock.send(responder.finish())
            ctl.wait_stop()

    def client(self, ctl: Control, p: Params, kind: Kind) -> Result:
        port = ctl.peer()["port"]
        with zmq.Context() as context, context.socket(zmq.REQ) as sock:
            limit(sock, p.timeout(kind))
            sock.connect(f"tcp://{HOST}:{port}")

            def roundtrip(request: bytes) -> bytes:
                sock.send(request, copy=False)
                return sock.recv()

            return drive(client_session(kind, p), roundtrip)


def limit(sock: zmq.Socket[Any], seconds: float) -> None:
    """Every send and receive gives up (zmq.Again) after ``seconds``; close drops unsent data."""
    sock.setsockopt(zmq.RCVTIMEO, int(seconds * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(seconds * 1000))
    sock.setsockopt(zmq.LINGER, 0)


CASE = ZmqTcp()
