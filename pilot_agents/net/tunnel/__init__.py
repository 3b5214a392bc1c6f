"""The tunnel protocol, sans-IO: Noise IK handshake, packets and frames, one peer's session
(replay window, loss recovery, congestion and flow control, streams on ports, paths), and the
mux that routes datagrams to sessions. Takes bytes and ``now``, returns bytes and deadlines;
imports no asyncio and no socket. Compiled with mypyc as one group (``net/_native.py``)."""
