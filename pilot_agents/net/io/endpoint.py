"""The asyncio driver of a :class:`Mux`: one non-blocking UDP socket and exactly one timer.

Reads drain the socket in a loop on each readiness callback (asyncio's datagram transport reads
one datagram per loop iteration, which caps throughput). What they make due to send leaves in
one flush at the end of that loop iteration; a delayed ACK alone waits for the timer, or for the
application's reply to carry it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from time import monotonic
from typing import Final

from ..traversal.beacon_client import BeaconEvent, Relayed
from ..traversal.fleet import FleetClient
from ..tunnel import events, wire
from ..tunnel.mux import Mux
from ..tunnel.paths import RelayPath
from .udp import DatagramReader, open_socket

log = logging.getLogger("pilot_agents.endpoint")
TIMER_SLACK: Final = 1 / 16


def is_tunnel_packet(data: bytes) -> bool:
    return bool(data) and wire.INITIATION <= data[0] <= 0x1F


class Endpoint:
    def __init__(
        self,
        mux: Mux,
        on_event: Callable[[events.Event], None],
        on_progress: Callable[[], None],
    ) -> None:
        """``on_progress`` runs after every flush: acknowledgements may have freed buffers."""
        self.mux = mux
        self.beacon: FleetClient | None = None
        self.on_beacon_event: Callable[[BeaconEvent], None] | None = None
        self._on_event = on_event
        self._on_progress = on_progress
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._reader: DatagramReader | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_handle: asyncio.Handle | None = None
        self.send_errors = 0

    @property
    def local_address(self) -> tuple[str, int]:
        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        return host, port

    def open(self, host: str, port: int) -> None:
        sock = open_socket(host, port, dont_fragment=True)
        self._sock = sock
        self._reader = DatagramReader(sock)
        self._loop.add_reader(sock.fileno(), self._read_ready)
        self._rearm()

    def close(self) -> None:
        self._cancel_scheduled_flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self._reader = None

    def now(self) -> float:
        """The protocol's clock: CLOCK_MONOTONIC, as the event loop's timers use, but read
        directly. uvloop's ``loop.time()`` counts whole milliseconds, too coarse for RTT
        samples on a LAN, and asyncio's reads the same clock behind a Python call."""
        return monotonic()

    def wake(self) -> None:
        """State changed outside a callback (an API call): flush soon, once."""
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _cancel_scheduled_flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def flush(self) -> None:
        """Send what is due right now (an API call that wants no extra loop iteration)."""
        if self._sock is not None:
            self._flush()

    def send_raw(self, data: bytes, address: tuple[str, int]) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(data, address)
        except OSError as exc:
            # A full socket buffer is a lost packet to the layers above: recovery resends it.
            self.send_errors += 1
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                log.debug("sendto %s failed: %s", address, exc)

    def _read_ready(self) -> None:
        reader = self._reader
        if self._sock is None or reader is None:
            return
        reader.read(self._receive, monotonic())
        # Hand what arrived to the application first, and leave the rest for a flush after the
        # tasks it woke: one of them may answer at once (a requester's next request), and its
        # write flushes (sending what is due, re-arming the timer) before anything else. A
        # delayed ACK alone waits for the timer, or for the application's reply to carry it.
        self._deliver_events()
        self.wake()

    def _receive(self, data: bytes, address: tuple[str, int], now: float) -> None:
        beacon = self.beacon
        if beacon is not None and address in beacon.addresses:
            beacon.receive_datagram(data, address, now)
            self._drain_beacon_events(now)
        else:
            self.mux.receive_datagram(data, address, now)

    def _drain_beacon_events(self, now: float) -> None:
        beacon = self.beacon
        assert beacon is not None
        event = beacon.next_event()
        while event is not None:
            if isinstance(event, Relayed) and is_tunnel_packet(event.packet):
                # A tunnel packet through the relay: the same session, another path.
                self._receive_relayed(beacon, event, now)
            elif self.on_beacon_event is not None:
                self.on_beacon_event(event)
            event = beacon.next_event()

    def _receive_relayed(self, beacon: FleetClient, event: Relayed, now: float) -> None:
        mux = self.mux
        path = RelayPath(event.source_key)
        if event.packet[0] != wire.INITIATION:
            mux.receive_datagram(event.packet, path, now)
            return
        # A relayed flood comes from the beacon's address, so only the beacon can filter it:
        # initiations we refuse (forged, untrusted, over their sender's budget, replayed) are
        # reported, and enough of them from one key make the beacon client ask for a block
        # (BeaconClientConfig.block_relay_after).
        stats = mux.stats
        refused = stats.refused()
        mux.receive_datagram(event.packet, path, now)
        if stats.refused() > refused:
            beacon.report_invalid_relayed(event.source_key, now)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = monotonic()
        self.mux.handle_timer(now)
        if self.beacon is not None:
            self.beacon.handle_timer(now)
            self._drain_beacon_events(now)
        self._flush()

    def _flush(self) -> None:
        self._cancel_scheduled_flush()  # this flush does its work
        mux = self.mux
        # Events first: what the node does about them (refusing a stream, say) then leaves in
        # the same packets as the acknowledgements.
        self._deliver_events()
        now = monotonic()
        beacon = self.beacon
        for data, address in mux.datagrams_to_send(now):
            if isinstance(address, RelayPath):
                # Through the peer's home beacon; None: held until we are a guest there.
                relayed = beacon.relay(address.peer, data, now) if beacon is not None else None
                if relayed is not None:
                    self.send_raw(relayed[0], relayed[1])
            else:
                self.send_raw(data, address)
        if beacon is not None:
            for data, address in beacon.datagrams_to_send(now):
                self.send_raw(data, address)
            self._drain_beacon_events(now)
        self._deliver_events()
        self._on_progress()
        self._rearm()

    def _deliver_events(self) -> None:
        mux = self.mux
        event = mux.next_event()
        while event is not None:
            self._on_event(event)
            event = mux.next_event()

    def _rearm(self) -> None:
        deadline = self.mux.get_timer()
        if self.beacon is not None:
            beacon_deadline = self.beacon.get_timer()
            if deadline is None or (beacon_deadline is not None and beacon_deadline < deadline):
                deadline = beacon_deadline
        if deadline is None:
            return
        # A timer that fires early is harmless (the mux checks what is due and we re-arm), so
        # only move it earlier: re-arming on every flush churns the event loop's timer heap.
        # Nor for a little: a deadline may be met late by a sixteenth of its lead time (as
        # Linux's timer slack), which spares a request/reply loop a new timer per request for
        # a delayed ACK due just before the armed loss timer; a pacing gap stays precise.
        if self._timer_at is not None:
            slack = (deadline - monotonic()) * TIMER_SLACK
            if self._timer_at <= deadline + slack:
                return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)
