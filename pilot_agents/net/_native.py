"""Which modules of the sans-IO core mypyc compiles, and a check that such a build is current.

setup.py compiles ``COMPILED`` when it can. A build in place (``pip install -e .`` or
``scripts/build-native.sh``) leaves an extension module next to each of those ``.py`` files, and
Python imports the extension first: after an edit to the ``.py`` the old code would run without
a word. :func:`stale` finds such modules. Standard library only and no relative imports, because
setup.py and tests/conftest.py load this file by path: importing the package would import the
stale build (and, in setup.py, dependencies a build environment lacks).
"""

from __future__ import annotations

import warnings
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

# Not noise (its work is in libsodium; tests monkeypatch noise.x25519 to count DH calls) nor
# stun and beacon_* (off the per-packet path). crypto is: its AEAD wrapper runs twice per packet.
# So are config and handshake, although little of their code runs per packet: the session reads
# their fields (SessionConfig, Keypair) on every packet, and compiled code reads an interpreted
# object's attribute through the generic getattr (5 % of a round trip's instructions). cookie
# and ratelimit run for every handshake packet of a flood. The endpoint and udp are compiled
# although they drive asyncio: their read and flush callbacks run for every datagram (~6% fewer
# instructions per round trip than with them interpreted).
# Named relative to pilot_agents.net: the tunnel protocol, and the asyncio driver around it.
COMPILED = (
    "tunnel.bbr", "tunnel.config", "tunnel.congestion", "tunnel.cookie", "tunnel.crypto",
    "tunnel.cubic", "tunnel.events", "tunnel.handshake", "tunnel.mux", "tunnel.pacing",
    "tunnel.paths", "tunnel.rangeset", "tunnel.ratelimit", "tunnel.recovery", "tunnel.replay",
    "tunnel.session", "tunnel.streams", "tunnel.wire",
    "io.endpoint", "io.udp",
)

# Hand-written C extension modules (name: source) built with the core; each has a fallback.
C_MODULES = {"tunnel._aead": "tunnel/_aead.c", "io._mmsg": "io/_mmsg.c"}

NET_DIR = Path(__file__).resolve().parent
REBUILD = "scripts/build-native.sh"


def source_path(name: str) -> str:
    """``tunnel.wire`` -> ``tunnel/wire.py``, relative to the net package."""
    return name.replace(".", "/") + ".py"


def stale(net_dir: Path = NET_DIR) -> list[str]:
    """Compiled modules whose source is newer than the extension module imported instead.

    Only a source checkout can hold such a build (an installed wheel has no setup.py beside the
    package; there, install order alone decides which file is newer)."""
    if not (net_dir.parent.parent / "setup.py").exists():
        return []
    suffix = EXTENSION_SUFFIXES[0]
    sources = {name: source_path(name) for name in COMPILED} | C_MODULES
    out = []
    for name, source in sources.items():
        try:
            built = (net_dir / f"{name.replace('.', '/')}{suffix}").stat().st_mtime
        except FileNotFoundError:
            continue
        if (net_dir / source).stat().st_mtime > built:
            out.append(name)
    return out


def stale_message(names: list[str]) -> str:
    return (f"pilot_agents: compiled {', '.join(names)} older than its source, so old code runs; "
            f"rebuild with {REBUILD} (or delete pilot_agents/net/*/*.so for pure Python)")


def warn_if_stale() -> None:
    if names := stale():
        warnings.warn(stale_message(names), RuntimeWarning, stacklevel=2)
