"""What the engine's Python lacks, what to do about it, and installing it into Slicer's Python.

Before a run the panel asks :func:`plan_dependencies` which of the engine's packages the chosen
interpreter lacks and what to do: nothing, ask the user (Slicer's own Python), or refuse with the
command to run (a user's own environment, or Slicer under ``--testing``). :func:`install_requirements`
then installs through what the running Slicer offers: ``slicer.packaging.pip_ensure`` (Slicer 5.12
and later) or ``slicer.util.pip_install`` (5.8, 5.10). The Slicer functions are passed in, so this
runs and is tested without Slicer; Slicer's own numpy, SimpleITK and VTK are pinned by a constraints
file so pip never replaces them.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

from ..base.errors import BadInputError
from . import dependencies

PathLike = Union[str, Path]
REQUESTER = "UNet3DSegment"
TORCH_EXTENSION_MISSING = (
    "PyTorch is missing for the torch backend; install the PyTorch extension (SlicerPyTorch) from the Extensions "
    "Manager, restart Slicer and press Segment again: it installs the PyTorch build that fits your GPU"
)
TORCH_INSTALL_FAILED = (
    "the PyTorch extension did not install PyTorch; install it from the PyTorch Utils module, then press Segment again"
)


@dataclass(frozen=True)
class DependencyPlan:
    """What the engine's Python lacks and what the panel does: ``ready``, ``ask`` (then install) or ``refuse``."""

    action: str
    missing: list[str] = field(default_factory=list)
    requirements: list[str] = field(default_factory=list)
    message: str = ""  # the question (ask) or the one-line error (refuse)


def plan_dependencies(
    python: Optional[PathLike],
    backend: str,
    requirements_file: Optional[PathLike] = None,
    testing: bool = False,
    env: Optional[Mapping[str, str]] = None,
) -> DependencyPlan:
    """The plan for interpreter ``python`` (None: Slicer's own) running the model on ``backend``."""
    missing = dependencies.missing_modules(python, dependencies.engine_modules(backend), env=env)
    if not missing:
        return DependencyPlan("ready")
    requirements = dependencies.requirements_for(missing, requirements_file)
    if python is not None:  # the user's own environment: say what to run, do not change it
        command = dependencies.install_command(python, requirements)
        return DependencyPlan("refuse", missing, requirements,
                              f"{python} lacks {', '.join(missing)}; install them with: {command}")
    if testing:
        return DependencyPlan("refuse", missing, requirements,
                              f"Slicer's Python lacks {', '.join(missing)}; not installing during tests")
    torch, _ = split_torch(requirements)
    via = " PyTorch comes through the PyTorch extension (SlicerPyTorch), which picks the build for your GPU." \
        if torch else ""
    question = (f"The segmentation engine needs {', '.join(requirements)} in Slicer's Python (TensorFlow or "
                "PyTorch is a download of several hundred MB). Slicer's own numpy, SimpleITK and VTK are kept."
                f"{via} Install now?")
    return DependencyPlan("ask", missing, requirements, question)


def split_torch(requirements: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether PyTorch is among ``requirements``, and the others (PyTorch goes through SlicerPyTorch in Slicer)."""
    others = [r for r in requirements if dependencies._requirement_name(r).lower() != "torch"]
    return len(others) != len(requirements), others


def pytorch_extension_installer() -> Callable[[], None]:
    """A callable that installs PyTorch through the SlicerPyTorch extension (it picks the build for the GPU).

    Raises ``BadInputError`` naming the extension when its ``PyTorchUtils`` module is not installed; the
    callable raises when the extension installed nothing.
    """
    try:
        import PyTorchUtils  # the PyTorch extension's module, present only where it is installed
    except ImportError:
        raise BadInputError(TORCH_EXTENSION_MISSING) from None

    def install_torch() -> None:
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
            raise BadInputError(TORCH_INSTALL_FAILED)

    return install_torch


def install_requirements(
    requirements: Sequence[str],
    pip_install: Callable[..., object],
    pip_ensure: Optional[Callable[..., object]] = None,
    skip_in_testing: bool = True,
) -> None:
    """pip-install ``requirements`` into Slicer's Python with Slicer's own packages pinned.

    ``pip_ensure`` is ``slicer.packaging.pip_ensure`` where the running Slicer has it (5.12+), else
    None and ``pip_install`` (``slicer.util.pip_install``) is used.
    """
    folder = Path(tempfile.mkdtemp(prefix="UNet3DSegment-pip-"))
    try:
        constraints = folder / "constraints.txt"
        constraints.write_text(dependencies.constraints_text(), encoding="utf-8")
        if pip_ensure is not None:
            pip_ensure(list(requirements), constraints=str(constraints), prompt_install=False, requester=REQUESTER,
                       skip_in_testing=skip_in_testing)
        else:
            pip_install(["-c", str(constraints)] + list(requirements))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
