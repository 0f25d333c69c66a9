#!/usr/bin/env bash
# The whole test suite from a fresh clone: create (or reuse) .venv, install the engine with its
# test extras, run pytest. Extra arguments go to pytest (e.g. scripts/test.sh -k tiling).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The browser test (Testing/test_web_app.py) drives Debian's chromium; it is skipped, with the
# reason shown, where no chromium can be had.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "test.sh: installing chromium for the browser test" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "test.sh: chromium could not be installed; the browser test will be skipped" >&2
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
exec .venv/bin/python -m pytest "$@"
