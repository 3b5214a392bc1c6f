#!/usr/bin/env bash
# Installs what benchmarks/patterns.py compares pilot-agents with, on a Debian machine:
# the servers (Debian's nats-server and redis-server) and the
# Python clients (the `bench` extra: eclipse-zenoh, nats-py, redis) into ./.venv. The benchmark
# starts its own server instances on ephemeral ports in temporary directories; a system service
# the packages may start is not used. Run scripts/install.sh --dev first (it creates .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/debian-packages.sh
install_missing_debian_packages nats-server redis-server

[ -x .venv/bin/python ] || { echo "no .venv: run scripts/install.sh --dev first" >&2; exit 1; }
.venv/bin/python -m pip install -q -e '.[dev,bench]'
echo "benchmark peers installed: $(command -v nats-server) $(command -v redis-server)"
