"""Congestion control over a lossy path, end to end: real beacon and nodes in the NAT lab, cone
<-> cone, 25 ms and 1 % random loss on each crossing between the homes.

Correctness, not speed (benchmarks/natlab_loss.py measures that): with every controller a 2 MiB
message arrives whole (SHA-256 checked inside ``run_transfer``), and the default controller gets
it there clearly sooner than NewReno, which takes every random loss for congestion.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.natlab_loss import Transfer, run_transfer
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.net.tunnel.congestion import ALGORITHMS
from tests.natlab import Lab
from tests.natlab.conftest_helpers import natlab_fixture  # noqa: F401 - fixture

SIZE = 2 << 20
LOSS = 0.01
TIMEOUT = 180.0  # seconds; NewReno needs ~10 s here on a quiet machine


def transfer(controller: str, tmp_path: Path) -> Transfer:
    workdir = tmp_path / controller
    workdir.mkdir()
    os.chmod(workdir, 0o755)  # runners write logs here as root from other namespaces
    with Lab(clean_stale=False) as lab:
        return run_transfer(
            lab, workdir, controller=controller, loss=LOSS, size=SIZE, timeout=TIMEOUT
        )


def test_every_controller_delivers_and_the_default_beats_newreno(
    natlab: None, tmp_path: Path
) -> None:
    os.chmod(tmp_path, 0o755)
    results = {name: transfer(name, tmp_path) for name in ALGORITHMS}
    print("\n" + ", ".join(f"{n} {r.mb_per_s:.2f} MB/s" for n, r in results.items()))
    default = SessionConfig().congestion.algorithm
    assert default != "newreno"
    assert results[default].seconds * 2 < results["newreno"].seconds, results
