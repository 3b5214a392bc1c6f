"""Which modules of the sans-IO core mypyc compiles (setup.py, when it can).

Standard library only and no relative imports: setup.py loads this file by path, as importing
the package needs dependencies that a build environment lacks.
"""

# Not crypto, noise, handshake (their work is in libsodium; tests monkeypatch noise.x25519 to
# count DH calls) nor the asyncio and socket code (endpoint, udp, stun, beacon_*): it waits on I/O.
COMPILED = (
    "congestion", "mux", "pacing", "paths", "rangeset", "recovery", "replay", "session",
    "streams", "wire",
)
