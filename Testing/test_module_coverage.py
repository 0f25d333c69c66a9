"""The module file is executed, not only parsed: line coverage of ``UNet3DSegment.py`` by its harness >= 80 %.

Runs ``Testing/test_slicer_module.py`` under coverage.py in a child process (measuring only the module
file) and reads the total. A panel feature without a harness test, or a harness that silently stops
importing the module file, drops the figure and fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "UNet3DSegment" / "UNet3DSegment.py"
MINIMUM_PERCENT = 80.0

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the harness's stand-in PythonSlicer is a shell script")


def test_the_harness_covers_at_least_80_percent_of_the_module_file(tmp_path):
    pytest.importorskip("coverage")
    env = dict(os.environ, COVERAGE_FILE=str(tmp_path / ".coverage"))
    run = subprocess.run(
        [sys.executable, "-m", "coverage", "run", f"--include={MODULE_FILE}", "-m", "pytest", "-q",
         "-p", "no:cacheprovider", str(ROOT / "Testing" / "test_slicer_module.py"),
         "-k", "not real_engine"],  # the stand-in engine exercises the same panel lines without TensorFlow
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = subprocess.run([sys.executable, "-m", "coverage", "report", "--format=total", "--precision=1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    percent = float(report.stdout.strip())
    missed = subprocess.run([sys.executable, "-m", "coverage", "report", "-m"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120).stdout
    assert percent >= MINIMUM_PERCENT, f"UNet3DSegment.py line coverage {percent} % < {MINIMUM_PERCENT} %\n{missed}"
