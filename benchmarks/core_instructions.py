"""Instructions per request/reply round trip of the sans-IO core, counted by valgrind.

Two Muxes exchange 100-byte messages over tests/simnet.py's simulated network on a fake clock,
so the count is deterministic to a fraction of a percent (no sockets, no timers firing in
valgrind's slowed-down time). Run twice, for a short and a long exchange, the difference divided
by the extra round trips leaves out start-up and the handshake. The count includes the
simulated network's own (interpreted) work, the same for every build: compare builds, not this
number with a wall-clock one.

    .venv/bin/python -m benchmarks.core_instructions [--tree DIR ...]

``--tree`` measures another checkout's build (e.g. a ``git worktree`` of an older commit, built
with its scripts/build-native.sh) beside this one, in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EXCHANGE = """
import sys
from simnet import SimNetwork

rounds = int(sys.argv[1])
net = SimNetwork(1)
a, b = net.pair()
session, stream = net.start_stream(a, b, 9, b"x" * 100)
assert net.run_until(lambda: len(b.messages) == 1, 10)
back = b.mux.get_session(a.key)
assert back is not None
stream_back = b.messages[0].stream_id
for i in range(rounds):
    back.send_message(stream_back, b"y" * 100)
    net.flush(b)
    assert net.run_until(lambda: len(a.messages) == i + 1, 10)
    session.send_message(stream, b"x" * 100)
    net.flush(a)
    assert net.run_until(lambda: len(b.messages) == i + 2, 10)
"""

SHORT, LONG = 100, 600


def instructions(tree: Path, rounds: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp, "exchange.py")
        script.write_text(EXCHANGE)
        env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'tests'}",
               "PYTHONHASHSEED": "0"}
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
             sys.executable, str(script), str(rounds)],
            env=env, capture_output=True, text=True, check=True, timeout=600)
    found = re.search(r"Collected : (\d+)", result.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{result.stderr}")
    return int(found.group(1))


def per_round_trip(tree: Path) -> float:
    return (instructions(tree, LONG) - instructions(tree, SHORT)) / (LONG - SHORT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="another checkout to measure beside this one")
    args = parser.parse_args()
    for tree in [*args.tree, ROOT]:
        print(f"{tree}: {per_round_trip(tree) / 1000:.1f} k instructions per round trip")


if __name__ == "__main__":
    main()
