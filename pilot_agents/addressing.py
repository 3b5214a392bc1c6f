"""Addresses as users type them: ``HOST:PORT`` and the beacon's ``KEY@HOST:PORT``.

The one parser of each, for every layer (the node, the beacon service, the CLI); their errors
are :class:`~pilot_agents.errors.ConfigError` with the text the user gave.
"""

from __future__ import annotations

import base64
import binascii

from .errors import ConfigError

HostPort = tuple[str, int]  # a UDP endpoint: an IP address or host name, and a port

KEY_SIZE = 32  # bytes of an Ed25519 public key: a node id (the beacon's too) encodes one


def parse_host_port(text: str) -> HostPort:
    """``"host:port"`` or ``"[v6]:port"``; an empty host means every interface (``0.0.0.0``),
    port 0 any free port (as a listen address takes them)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{text!r} is not HOST:PORT")
    if int(port) > 65535:
        raise ConfigError(f"{text!r}: port {port} is not in 0..65535")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_beacon_spec(text: str, given_as: str = "--beacon ") -> tuple[bytes | None, HostPort]:
    """``KEY@HOST:PORT`` or ``HOST:PORT`` (as ``--beacon`` takes it) to ``(key or None,
    (host, port))``. KEY is the beacon's node id, pinned instead of learnt on first contact;
    HOST may be a name the caller resolves. ``given_as`` starts the text in an error's message
    (where the user wrote it; "" where the message is already placed, as a file's field)."""
    key_text, _, address = text.strip().rpartition("@")
    key = None
    if key_text:
        try:
            key = base64.b32decode(key_text.upper() + "=" * (-len(key_text) % 8))
        except (binascii.Error, ValueError):
            key = None
        if key is None or len(key) != KEY_SIZE:
            raise ConfigError(f"{key_text!r} in {given_as}{text!r} is not a beacon key (a "
                              "node id)")
    host, sep, port = address.rpartition(":")
    if not host.strip("[]") or not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{given_as}{text!r}: expected KEY@HOST:PORT or HOST:PORT")
    return key, parse_host_port(address)


def parse_beacon_list(text: str,
                      given_as: str = "--beacon ") -> tuple[bytes | None, list[HostPort]]:
    """``A,B,...`` of :func:`parse_beacon_spec` (the beacons of a fleet, preferred first) to
    ``(key or None, addresses)``. A fleet signs with one key, so the keys given must agree."""
    specs = [parse_beacon_spec(part, given_as) for part in text.split(",") if part.strip()]
    if not specs:
        raise ConfigError(f"{given_as}{text!r}: expected HOST:PORT[,HOST:PORT...]")
    keys = {key for key, _ in specs if key is not None}
    if len(keys) > 1:
        raise ConfigError(
            f"{given_as}{text!r}: the beacons of a fleet share one key; give it once or the same "
            "on each"
        )
    return (keys.pop() if keys else None), [address for _, address in specs]
