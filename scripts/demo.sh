#!/usr/bin/env bash
# The main job from a fresh clone: create (or reuse) .venv, install the engine with the demo extras,
# segment the MNI152 T1 brain MRI that nilearn ships with the bundled model. Output in demo-output/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[demo]"
exec .venv/bin/unet3d-segment demo "$@"
