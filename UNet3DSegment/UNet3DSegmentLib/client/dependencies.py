"""Which Python runs the engine, and what it still needs: checks without importing TensorFlow.

The engine runs in a child process, in Slicer's own Python (PythonSlicer) or in a Python environment
the user points to (e.g. a conda env with a GPU build of TensorFlow). Before a run the panel asks
here which of the engine's packages that interpreter lacks; for Slicer's own Python it then offers to
install them, pinning the packages Slicer ships (numpy, SimpleITK, vtk) so that pip never replaces
them. Finding a package uses ``importlib.util.find_spec``: no import, so TensorFlow's seconds-long
start-up is not paid for the check.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from ..base.options import SegmentOptions
from ..base.errors import BadInputError

PathLike = Union[str, Path]
# With another Keras backend the engine needs Keras itself and that framework instead of TensorFlow.
BACKEND_MODULES = {"tensorflow": ("tensorflow",), "torch": ("keras", "torch"), "jax": ("keras", "jax")}
ENGINE_MODULES = BACKEND_MODULES["tensorflow"] + ("SimpleITK", "numpy")
# pip name of each module the engine needs (what to install when it is missing).
PIP_NAMES = {"tensorflow": "tensorflow", "SimpleITK": "SimpleITK", "numpy": "numpy", "keras": "keras>=3.11",
             "torch": "torch", "jax": "jax"}
# Packages Slicer ships itself: installing must never replace them.
SLICER_OWN_PACKAGES = ("numpy", "SimpleITK", "vtk")
CHECK_TIMEOUT_SECONDS = 60.0

_PROBE = (
    "import importlib.util, json, sys\n"
    "names = json.loads(sys.argv[1])\n"
    "print(json.dumps([n for n in names if importlib.util.find_spec(n) is None]))\n"
)


def engine_modules(backend: str = "tensorflow") -> tuple[str, ...]:
    """The modules the engine imports when the model runs on Keras backend ``backend``."""
    return BACKEND_MODULES[SegmentOptions.spec("backend").check(backend)] + ENGINE_MODULES[1:]


def missing_modules(
    python_executable: Optional[PathLike] = None,
    modules: Sequence[str] = ENGINE_MODULES,
    env: Optional[Mapping[str, str]] = None,
) -> list[str]:
    """Modules of ``modules`` that ``python_executable`` cannot import (None: this interpreter)."""
    if python_executable is None:
        return [name for name in modules if importlib.util.find_spec(name) is None]
    command = [str(python_executable), "-c", _PROBE, json.dumps(list(modules))]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=CHECK_TIMEOUT_SECONDS,
                                env=None if env is None else dict(env), stdin=subprocess.DEVNULL)
    except FileNotFoundError as error:
        raise BadInputError(
            f"Python executable {python_executable} not found; choose an existing interpreter"
        ) from error
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BadInputError(
            f"cannot run {python_executable} ({error}); check that it is a Python executable"
        ) from error
    try:
        return list(json.loads(result.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError) as error:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BadInputError(
            f"{python_executable} is not a working Python ({detail}); choose another interpreter"
        ) from error


def requirements_for(missing: Sequence[str], requirements_file: Optional[PathLike] = None) -> list[str]:
    """pip requirement strings for the ``missing`` modules, versions taken from ``requirements_file``."""
    pinned: dict[str, str] = {}
    if requirements_file is not None:
        for line in Path(requirements_file).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name = _requirement_name(line)
                pinned[name.lower()] = line
    result = []
    for module in missing:
        pip_name = PIP_NAMES.get(module, module)
        result.append(pinned.get(_requirement_name(pip_name).lower(), pip_name))
    return result


def _requirement_name(requirement: str) -> str:
    for index, char in enumerate(requirement):
        if not (char.isalnum() or char in "-_."):
            return requirement[:index]
    return requirement


def constraints_text(packages: Sequence[str] = SLICER_OWN_PACKAGES) -> str:
    """A pip constraints file pinning the installed version of each of ``packages`` that pip knows."""
    lines = []
    for name in packages:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue  # built into Slicer rather than installed by pip: pip cannot replace it either
    return "\n".join(lines) + ("\n" if lines else "")


def install_command(python_executable: PathLike, requirements: Sequence[str]) -> str:
    """The command a user runs to give another Python environment what the engine needs."""
    quoted = " ".join(f'"{r}"' if any(c in r for c in "<>= ") else r for r in requirements)
    return f'"{python_executable}" -m pip install {quoted}'
