"""Just enough of a pcap reader to pull UDP datagrams out of a ``Lab.capture`` file.

For tests like "the relay sees only ciphertext": read what the beacon's interface saw and search
the payloads for plaintext. Handles classic pcap (not pcapng) with Ethernet (``-i eth0``) or Linux
cooked (``-i any``) framing, IPv4 only -- which is what tcpdump writes in the lab.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276


@dataclass(frozen=True)
class UdpDatagram:
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes


def udp_datagrams(path: str | Path) -> list[UdpDatagram]:
    data = Path(path).read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap file (pcapng is not supported)")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    l2_len = {LINKTYPE_ETHERNET: 14, LINKTYPE_LINUX_SLL: 16, LINKTYPE_LINUX_SLL2: 20}.get(linktype)
    if l2_len is None:
        raise ValueError(f"{path}: unsupported link type {linktype}")
    out = []
    off = 24
    while off + 16 <= len(data):
        incl_len = struct.unpack(endian + "I", data[off + 8 : off + 12])[0]
        frame = data[off + 16 : off + 16 + incl_len]
        off += 16 + incl_len
        ip = frame[l2_len:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_UDP:
            continue
        ihl = (ip[0] & 0x0F) * 4
        udp = ip[ihl:]
        if len(udp) < 8:
            continue
        sport, dport, ulen = struct.unpack("!HHH", udp[:6])
        out.append(
            UdpDatagram(
                src=(socket.inet_ntoa(ip[12:16]), sport),
                dst=(socket.inet_ntoa(ip[16:20]), dport),
                payload=bytes(udp[8:ulen]),
            )
        )
    return out
