#!/usr/bin/env bash
# Installs third-party MCP servers from PyPI, each in a venv of its own under .mcp-servers/NAME/
# (they pin their own mcp versions, as MCP users run them with uvx or pipx):
#   scripts/install-mcp-servers.sh                  the servers the tests and examples/pipeline use
#   scripts/install-mcp-servers.sh PACKAGE...       those packages instead
# A server already installed is kept; its command is .mcp-servers/NAME/bin/NAME.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
servers=("$@")
[ ${#servers[@]} -eq 0 ] && servers=(mcp-server-time mcp-server-fetch mcp-alchemy mcp-email-server)

for name in "${servers[@]}"; do
  venv=".mcp-servers/$name"
  if [ -x "$venv/bin/$name" ]; then
    continue
  fi
  rm -rf "$venv"
  "$python" -m venv "$venv"
  # The server's own constraints, not this project's: pip's global constraints file (if any)
  # pins mcp for pilot-agents itself.
  PIP_CONSTRAINT="" "$venv/bin/python" -m pip install -q --disable-pip-version-check "$name"
  echo "installed $name in $(pwd)/$venv"
done
