"""The protocol core compiled with mypyc (setup.py) and its pure-Python fallback: the fallback
works from the .py files alone, a compiled build is really the one imported, and both run the
same protocol, packet for packet."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import pilot_agents
from pilot_agents.net import _native
from tests.conftest import ROOT

SUFFIX = EXTENSION_SUFFIXES[0]

# A lossy, reordering link and one message large enough to need recovery and congestion
# control. Prints where each compiled-or-not module came from and what the exchange did.
EXCHANGE = """
import dataclasses, json
from importlib import import_module
from pilot_agents.net import _native
from simnet import LinkProfile, SimNetwork

net = SimNetwork(7, LinkProfile(loss=0.05, reorder=0.1, jitter=0.002))
a, b = net.pair()
sent = [b"hello", bytes(range(256)) * 800, b"bye"]
session, _ = net.start_stream(a, b, 9, *sent)
done = net.run_until(lambda: len(b.messages) == len(sent), 30)
print(json.dumps({
    "files": {n: import_module(f"pilot_agents.net.{n}").__file__ for n in _native.COMPILED},
    "done": done and [m.data for m in b.messages] == sent,
    "trace": [net.now, net.delivered, net.dropped, dataclasses.asdict(session.stats)],
}))
"""


def run_exchange(pythonpath: Path, cwd: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    result = subprocess.run([sys.executable, "-c", EXCHANGE], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def pure_exchange(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The exchange on a copy of the package's .py files only, as an install without a C
    compiler has them."""
    copy = tmp_path_factory.mktemp("pure")
    shutil.copytree(ROOT / "pilot_agents", copy / "pilot_agents",
                    ignore=lambda d, names: [n for n in names
                                             if not n.endswith(".py") and not Path(d, n).is_dir()])
    shutil.copy(ROOT / "tests/simnet.py", copy)
    result = run_exchange(copy, copy)
    result["copy"] = str(copy)
    return result


def test_pure_python_fallback_runs_the_protocol(pure_exchange: dict[str, object]) -> None:
    files = pure_exchange["files"]
    assert isinstance(files, dict)
    for name, file in files.items():
        assert file == os.path.join(str(pure_exchange["copy"]), "pilot_agents", "net",
                                    _native.source_path(name)), (name, file)
    assert pure_exchange["done"] is True


def test_this_build_runs_the_same_protocol_as_pure_python(
        pure_exchange: dict[str, object]) -> None:
    """Deterministic simulation: whatever build the repo holds, the same packets, drops and
    timings as the pure-Python copy."""
    this_build = run_exchange(ROOT, ROOT / "tests")
    assert this_build["done"] is True
    assert this_build["trace"] == pure_exchange["trace"]


def test_compiled_build_is_the_one_imported() -> None:
    assert Path(pilot_agents.__file__).is_relative_to(ROOT), (
        f"pilot_agents imported from {pilot_agents.__file__}, not from this checkout")
    built = [n for n in _native.COMPILED
             if (_native.NET_DIR / f"{n.replace('.', '/')}{SUFFIX}").exists()]
    if not built:
        pytest.skip("no compiled build here (pure Python); scripts/build-native.sh makes one")
    assert built == list(_native.COMPILED), "a partial build: rerun scripts/build-native.sh"
    for name in [*_native.COMPILED, *_native.C_MODULES]:
        module = importlib.import_module(f"pilot_agents.net.{name}")
        assert module.__file__ is not None and module.__file__.endswith(SUFFIX), module.__file__
    from pilot_agents.net.tunnel import crypto
    assert crypto.AEAD_BACKEND == "C"


def test_stale_build_is_found(tmp_path: Path) -> None:
    net = tmp_path / "pilot_agents" / "net"
    (net / "tunnel").mkdir(parents=True)
    source, built = net / "tunnel/session.py", net / f"tunnel/session{SUFFIX}"
    source.touch()
    built.touch()
    os.utime(built, (0, 0))
    assert _native.stale(net) == [], "outside a source checkout (no setup.py) nothing is stale"
    (tmp_path / "setup.py").touch()
    assert _native.stale(net) == ["tunnel.session"]
    built.touch()
    assert _native.stale(net) == []
    # a hand-written C module
    c_source, c_built = net / "tunnel/_aead.c", net / f"tunnel/_aead{SUFFIX}"
    c_source.touch()
    c_built.touch()
    os.utime(c_built, (0, 0))
    assert _native.stale(net) == ["tunnel._aead"]
