"""A data socket's client that asks for answers (a port socket's ``sync``, a stream socket's
``drain``) and never reads them: the daemon stops reading it once what it left unread is more
than the messages written to it can be, instead of holding every answer; every answer comes
once it reads."""

from __future__ import annotations

import json
import threading

from pilot_agents import ipc
from tests.conftest import ipc_call, stop_daemons
from tests.datasock_helpers import WAIT, FramedSocket, assert_clean_logs, connect, started

MiB = 1024 * 1024
ASKED = 300_000  # answers of 15-70 bytes: several times the 2 MiB the daemons let go unread


def flood_then_read(sock: FramedSocket, frame: bytes, answer_kind: int) -> None:
    """Write ASKED copies of ``frame`` without reading: the writer must block; then read, and
    every answer comes, of ``answer_kind``, and the writer finishes."""
    chunk = b"".join(ipc.pack_frames([frame])) * 1000
    sent = [0]

    def write() -> None:
        for _ in range(ASKED // 1000):
            sock.sock.sendall(chunk)
            sent[0] += 1

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(3.0)
    stalled_at = sent[0]
    writer.join(2.0)  # no longer read: nothing more goes
    assert writer.is_alive() and sent[0] == stalled_at, \
        "the daemon went on taking what asks for answers its client does not read"
    reader = ipc.FrameReader(1 << 20)
    answers = 0
    while answers < ASKED:
        data = sock.sock.recv(1 << 20)
        assert data, "the daemon closed the data socket"
        for (header,) in reader.feed(data):
            assert header[0] == answer_kind and json.loads(header[1:])["ok"], header
            answers += 1
    writer.join(WAIT)
    assert not writer.is_alive()


def test_a_port_socket_client_that_does_not_read_its_answers_is_not_read() -> None:
    (b,) = started(("beta", {"max_payload_bytes": MiB}))
    sock = FramedSocket(b)
    try:
        sock.write([json.dumps({"cmd": "port_attach", "id": 1, "port": 4501,
                                "credit_messages": 0, "credit_bytes": 0}).encode()])
        assert json.loads(sock.next()[0])["ok"]
        flood_then_read(sock, bytes([ipc.PORT_SYNC]), ipc.PORT_SYNCED)
        assert_clean_logs(b)
    finally:
        sock.close()
        stop_daemons(b.home)


def test_a_stream_socket_client_that_does_not_read_its_answers_is_not_read() -> None:
    a, b = started(("alpha", {"max_payload_bytes": MiB}), ("beta", {}))
    sock = FramedSocket(a)
    try:
        assert ipc_call(b.home, cmd="listen", port=4502)["ok"]
        stream = connect(a, 4502)
        sock.write([json.dumps({"cmd": "stream_attach", "id": 1, "stream": stream}).encode()])
        assert json.loads(sock.next()[0])["ok"]
        flood_then_read(sock, bytes([ipc.DATA_DRAIN]) + b'{"timeout":5}', ipc.DATA_DRAINED)
        assert_clean_logs(a, b)
    finally:
        sock.close()
        stop_daemons(a.home, b.home)
