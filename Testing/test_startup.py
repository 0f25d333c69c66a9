"""Start-up cost of the command line (issue 15): nothing heavy is imported before it is needed.

Each check runs in a fresh interpreter (a subprocess), since this test process has long imported
everything. Measured in ``benchmarks/startup.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from UNet3DSegmentLib.runtime.tensorflow_setup import KERAS_EXTRAS, without_keras_extras

HEAVY = ("tensorflow", "keras", "matplotlib", "nilearn", "sklearn", "pandas", "torch", "jax")


def imported_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; return ``{"modules": [...], "result": ...}`` it printed."""
    script = (
        "import json, sys\n" + code + "\n"
        "print(json.dumps({'modules': sorted(sys.modules), 'result': globals().get('result')}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def heavy_in(modules: list) -> list:
    return [name for name in HEAVY if name in modules]


def test_cli_import_and_help_import_no_framework() -> None:
    """``--help`` of every sub-command: the parser is built and printed without TensorFlow, matplotlib, nilearn."""
    seen = imported_after(
        "from UNet3DSegmentLib.cli.main import main\n"
        "for argv in (['--help'], ['segment', '--help'], ['demo', '--help'], ['serve', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == 0, stop.code\n"
    )
    assert heavy_in(seen["modules"]) == []


def test_demo_finds_the_template_without_importing_nilearn() -> None:
    """The demo reads nilearn's MNI152 files; importing nilearn only to find their folder cost 2-4 s."""
    if importlib.util.find_spec("nilearn") is None:
        pytest.skip("nilearn is not installed")
    seen = imported_after(
        "from UNet3DSegmentLib.training.demo import mni152_paths\n"
        "result = {k: str(v) for k, v in mni152_paths().items()}\n"
    )
    assert "nilearn" not in seen["modules"]
    import nilearn.datasets

    folder = Path(nilearn.datasets.__file__).resolve().parent / "data"  # where nilearn itself looks
    assert {Path(p).parent for p in seen["result"].values()} == {folder}


def test_tensorflow_starts_without_keras_extras_which_stay_importable() -> None:
    """TensorFlow and Keras load without scikit-learn, pandas and matplotlib; those import normally afterwards."""
    installed = [name for name in KERAS_EXTRAS if importlib.util.find_spec(name) is not None]
    if importlib.util.find_spec("tensorflow") is None or not installed:
        pytest.skip("needs TensorFlow and at least one of Keras' optional extras")
    seen = imported_after(
        "from UNet3DSegmentLib.runtime.tensorflow_setup import import_tensorflow_quietly\n"
        "import_tensorflow_quietly()\n"
        "import keras\n"
        f"result = [name for name in {installed!r} if name in sys.modules]\n"
        f"for name in {installed!r}:\n"
        "    __import__(name)\n"
    )
    assert "tensorflow" in seen["modules"] and "keras" in seen["modules"]
    assert seen["result"] == []  # not imported by TensorFlow's start
    assert all(name in seen["modules"] for name in installed)  # and importable again afterwards


def test_without_keras_extras_blocks_only_new_imports_and_restores() -> None:
    """Inside: a module not imported yet fails to import; one already imported is untouched; after: normal."""
    name = "colorsys"  # standard library, small, not imported by the test run
    sys.modules.pop(name, None)
    with without_keras_extras((name, "json")):
        with pytest.raises(ImportError):
            importlib.import_module(name)
        assert importlib.import_module("json") is sys.modules["json"]
    assert importlib.import_module(name).__name__ == name
    assert sys.modules["json"] is not None


def test_without_keras_extras_restores_after_an_error() -> None:
    """An exception inside (a failed TensorFlow import) still lifts the block."""
    name = "colorsys"
    sys.modules.pop(name, None)
    with pytest.raises(RuntimeError):
        with without_keras_extras((name,)):
            raise RuntimeError("import failed")
    assert name not in sys.modules or sys.modules[name] is not None
    assert importlib.import_module(name).__name__ == name
