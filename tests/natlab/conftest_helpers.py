"""pytest fixtures for NAT-lab tests. Import them into a test module::

    from tests.natlab.conftest_helpers import lab_fixture, natlab_fixture  # noqa: F401

The lab tests skip only when they cannot possibly run (not root, or network namespaces not
available); a missing tool such as iptables is an error, not a skip, so CI can't pass vacuously.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from .topology import NS_PREFIX, Lab, cleanup_stale


@functools.cache
def natlab_unavailable_reason() -> str | None:
    """Why the lab can't run here, or None. Probes by really creating a namespace."""
    if os.geteuid() != 0:
        return "NAT lab needs root (network namespaces, iptables)"
    if shutil.which("ip") is None:
        return "NAT lab needs 'ip' (apt-get install iproute2)"
    probe = f"{NS_PREFIX}{os.getpid()}-0-probe"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return f"'ip netns add' does not work here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def require_natlab() -> None:
    reason = natlab_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session", name="natlab")
def natlab_fixture() -> None:
    """Skip unless the lab can run; remove leftovers of crashed runs once per session."""
    require_natlab()
    cleanup_stale()


@pytest.fixture(name="lab")
def lab_fixture(natlab: None) -> Iterator[Lab]:
    """A fresh, empty lab (just the internet router) for one test."""
    with Lab(clean_stale=False) as lab:
        yield lab
