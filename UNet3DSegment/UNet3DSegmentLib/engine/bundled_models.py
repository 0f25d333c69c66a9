"""Where the models bundled with the extension live, in every install layout.

The demo model sits in the extension-level ``Resources/Models/`` folder so that the Slicer module and
the command line share one copy. Depending on how the engine was installed that folder is found:
- source checkout or editable install: ``<repo>/Resources/Models``;
- Slicer extension install: ``<module dir>/Resources/Models`` (CMake installs it next to the module);
- ``pip install .``: ``<prefix>/share/unet3dsegment/Models`` (wheel data files);
- anywhere: the folder named by ``UNET3DSEGMENT_MODELS_DIR``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..base.errors import BadModelError

DEFAULT_MODEL_NAME = "brain_tissue_demo"
MODELS_DIR_VARIABLE = "UNET3DSEGMENT_MODELS_DIR"


def candidate_model_dirs() -> list[Path]:
    """Folders searched for bundled models, most specific first."""
    here = Path(__file__).resolve().parent.parent  # .../UNet3DSegment/UNet3DSegmentLib
    folders = []
    if os.environ.get(MODELS_DIR_VARIABLE):
        folders.append(Path(os.environ[MODELS_DIR_VARIABLE]))
    folders += [
        here.parent.parent / "Resources" / "Models",  # source checkout
        here.parent / "Resources" / "Models",  # Slicer extension install
        Path(sys.prefix) / "share" / "unet3dsegment" / "Models",  # pip install
    ]
    return folders


def default_model_path(name: str = DEFAULT_MODEL_NAME) -> Path:
    """Path of the bundled model ``<name>.keras``; BadModelError saying where it looked if absent."""
    for folder in candidate_model_dirs():
        path = folder / f"{name}.keras"
        if path.is_file():
            return path
    searched = ", ".join(str(f) for f in candidate_model_dirs())
    raise BadModelError(
        f"bundled model {name}.keras not found (looked in {searched}); pass --model PATH or set "
        f"{MODELS_DIR_VARIABLE} to the folder holding it"
    )
