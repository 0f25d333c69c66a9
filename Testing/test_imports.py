"""The engine stays free of Slicer and Qt, and loads TensorFlow only where a model is needed."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import UNet3DSegmentLib

ENGINE_DIR = Path(UNet3DSegmentLib.__file__).parent
FORBIDDEN = ("slicer", "qt", "vtk", "tensorflow", "keras", "torch", "jax")


def engine_modules() -> list[str]:
    """Every engine module: all of UNet3DSegmentLib except the MRML layer (mrml_*)."""
    names = [m.name for m in pkgutil.iter_modules([str(ENGINE_DIR)])]
    return sorted(f"UNet3DSegmentLib.{n}" for n in names if not n.startswith("mrml") and n != "__main__")


def imported_after(code: str) -> set[str]:
    """Top-level module names imported by a fresh interpreter after running ``code``."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(output.stdout.strip().splitlines()[-1]))


def test_engine_modules_exist() -> None:
    names = engine_modules()
    for expected in ("cli", "inference", "model_io", "network", "pipeline", "preprocessing"):
        assert f"UNet3DSegmentLib.{expected}" in names


def test_importing_every_engine_module_loads_no_slicer_qt_or_tensorflow() -> None:
    code = "\n".join(f"import {name}" for name in engine_modules())
    loaded = imported_after(code)
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))


def test_help_does_not_import_tensorflow() -> None:
    code = (
        "from UNet3DSegmentLib.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "for c in ['segment']:\n"
        "    try:\n        main([c, '--help'])\n    except SystemExit:\n        pass\n"
    )
    loaded = imported_after(code)
    assert "tensorflow" not in loaded and "keras" not in loaded


def test_module_file_is_importable_without_engine_running_tf() -> None:
    """The package import itself is cheap: no numpy-heavy or TF import at package import."""
    loaded = imported_after("import UNet3DSegmentLib")
    assert "tensorflow" not in loaded and "SimpleITK" not in loaded
