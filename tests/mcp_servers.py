"""The third-party MCP servers the tests run (real ones from PyPI, never ours): each in a venv of
its own under .mcp-servers/, installed on first use by scripts/install-mcp-servers.sh.

    from tests.mcp_servers import server_command, servers_fixture  # noqa: F401
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

SERVERS = ROOT / ".mcp-servers"


@pytest.fixture(scope="module", name="servers")
def servers_fixture() -> Path:
    """The third-party servers' venvs; installed on first use (PyPI must be reachable)."""
    result = subprocess.run([ROOT / "scripts/install-mcp-servers.sh"], capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        pytest.skip(f"cannot install the MCP servers from PyPI: {result.stderr[-500:]}")
    return SERVERS


def server_command(servers: Path, name: str) -> str:
    return str(servers / name / "bin" / name)
