"""A STUN-like "what is my address" UDP server for the NAT lab.

Every datagram is answered, from the port it arrived on, with one JSON object:
``{"mapped": [ip, port], "data": <the payload as latin-1 text>, "via": <our port>}`` -- "mapped" is
the sender's address as seen here, i.e. its reflexive (NAT-mapped) address.

Prints ``{"ready": true, "ports": [...]}`` once every socket is bound. With ``--lifeline`` it exits
when stdin reaches EOF (so it dies with the test process that started it). Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument(
        "--port",
        type=int,
        action="append",
        required=True,
        help="UDP port to answer on; repeat for several",
    )
    parser.add_argument("--lifeline", action="store_true", help="exit on EOF on stdin")
    args = parser.parse_args()

    socks = {}
    for port in args.port:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # a burst of 1000 pings must not overflow the receive queue while we answer
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((args.bind, port))
        socks[s.fileno()] = s
    print(
        json.dumps({"ready": True, "ports": [s.getsockname()[1] for s in socks.values()]}),
        flush=True,
    )

    watch = list(socks)
    if args.lifeline:
        watch.append(sys.stdin.fileno())
    while True:
        readable, _, _ = select.select(watch, [], [])
        for fd in readable:
            if fd not in socks:
                if not os.read(fd, 4096):
                    return 0
                continue
            s = socks[fd]
            try:
                data, (ip, port) = s.recvfrom(65535)
            except OSError:
                continue  # e.g. ICMP-induced ECONNREFUSED: nothing to answer
            answer = {
                "mapped": [ip, port],
                "data": data.decode("latin-1"),
                "via": s.getsockname()[1],
            }
            with contextlib.suppress(OSError):
                s.sendto(json.dumps(answer).encode(), (ip, port))


if __name__ == "__main__":
    sys.exit(main())
