#!/usr/bin/env bash
# The whole test suite from a fresh clone: create (or reuse) .venv, install the engine with its
# test extras, run pytest. Extra arguments go to pytest (e.g. scripts/test.sh -k tiling).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
exec .venv/bin/python -m pytest "$@"
