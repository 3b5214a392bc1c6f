# The C module _mmsg.c: many UDP datagrams per system call (recvmmsg, sendmmsg; Linux only).
from collections.abc import Callable

NOT_NUMERIC: int

class Receiver:
    def __init__(self, count: int, size: int) -> None: ...
    def read(
        self, fd: int, receive: Callable[[bytes, tuple[str, int], float], object], now: float, /
    ) -> int: ...

def send(
    fd: int,
    family: int,
    datagrams: list[tuple[bytes, tuple[str, int]]],
    gso_size: int,
    gso_segments: int,
    gso_bytes: int,
    /,
) -> list[tuple[int, int, int]]: ...
