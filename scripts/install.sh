#!/usr/bin/env bash
# Installs pilot-agents into ./.venv on a Debian machine.
#   scripts/install.sh        runtime: libsodium, Python venv, the package, and what the example
#                             pipeline needs (examples/pipeline/requirements.txt, and the
#                             third-party MCP servers in venvs of their own: .mcp-servers/)
#   scripts/install.sh --dev  plus test tools: pytest and friends, the NAT lab's
#                             iproute2, iptables, conntrack, tcpdump (the lab needs root), and
#                             redis-server (the beacon fleet's tests start their own)
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

source scripts/debian-packages.sh
packages=(python3 python3-venv python3-dev gcc libsodium23)  # gcc: see setup.py
[ $dev -eq 1 ] && packages+=(iproute2 iptables conntrack tcpdump redis-server)

install_missing_debian_packages "${packages[@]}"

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ $dev -eq 1 ]; then
  .venv/bin/python -m pip install -q -e '.[dev]'
else
  .venv/bin/python -m pip install -q -e .
fi
# The example's own needs (a chart, a local SMTP server), not the package's.
.venv/bin/python -m pip install -q -r examples/pipeline/requirements.txt
scripts/install-mcp-servers.sh
echo "pilot-agents installed in $(pwd)/.venv"
