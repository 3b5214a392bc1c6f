#!/usr/bin/env bash
# Compiles the protocol core in place (pilot_agents/net/*/*.so; which modules: pilot_agents/net/
# _native.py), as `pip install -e .` does, without reinstalling. Run it after editing one of
# those modules: Python imports the .so, not the .py. Only modules whose C changed recompile.
# Uses $PYTHON, else .venv/bin/python, else python3; that environment needs mypy (~=2.4.0).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && python=.venv/bin/python

if ! "$python" -c "import mypyc" 2>/dev/null; then
  echo "build-native: $python has no mypyc: install mypy~=2.4.0 there, or rerun pip install -e ." >&2
  exit 1
fi
# Asked for a compiled build, so setup.py must not skip it.
PILOT_PURE_PYTHON=0 "$python" setup.py -q build_ext --inplace
# setup.py falls back to pure Python when the C compiler fails: that is a failure here.
"$python" - <<'PY'
import runpy, sys
native = runpy.run_path("pilot_agents/net/_native.py")
if stale := native["stale"]():
    sys.exit("build-native: still stale after the build: " + ", ".join(stale))
PY
