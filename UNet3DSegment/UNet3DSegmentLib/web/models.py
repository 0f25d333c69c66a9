"""The models the web page may choose from, fixed when the server starts.

The page offers a choice list, never a free path: the bundled demo model, the ``--model`` given at
launch and the models found in ``--models-dir`` (``.keras``, ``.h5``/``.hdf5`` files and SavedModel
folders directly inside it). Whatever the browser sends is checked against this list
(:meth:`ModelChoices.check`), so the page cannot probe or read other files of the server.

Free of trame and Slicer, so tests call it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from ..base.errors import BadInputError, BadModelError, UNet3DSegmentError

PathLike = Union[str, Path]
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
MAX_LISTED = 500  # a folder with more entries than this is not a models folder: the first ones are listed


class ModelChoices:
    """``items``: ``[{"title", "value"}]`` for the page's list; ``value`` is the model's resolved path."""

    def __init__(self, model: Optional[PathLike] = None, models_dir: Optional[PathLike] = None,
                 bundled: bool = True) -> None:
        items: list[dict] = []
        if model is not None:
            path = Path(model).expanduser().resolve()
            items.append({"title": f"{path.name} (--model)", "value": str(path)})
        if bundled:
            try:
                from ..engine.bundled_models import default_model_path

                path = default_model_path().resolve()
                items.append({"title": f"Bundled demo model ({path.name})", "value": str(path)})
            except UNet3DSegmentError:
                pass  # no bundled model in this install
        if models_dir is not None:
            items += [{"title": path.name, "value": str(path)} for path in models_in(models_dir)]
        unique: dict[str, dict] = {}
        for item in items:
            unique.setdefault(item["value"], item)  # a path listed twice keeps its first title
        self.items = list(unique.values())

    @property
    def values(self) -> list[str]:
        return [item["value"] for item in self.items]

    @property
    def default(self) -> str:
        return self.items[0]["value"] if self.items else ""

    def check(self, value: object) -> str:
        """``value`` if it is one of the listed models, else ``BadInputError`` (nothing about the path is revealed)."""
        if isinstance(value, str) and value in self.values:
            return value
        raise BadInputError("choose one of the listed models; the page cannot name other files "
                            "(start the server with --model or --models-dir to add models)")


def models_in(folder: PathLike) -> list[Path]:
    """Model files and SavedModel folders directly inside ``folder``, sorted by name."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise BadModelError(f"--models-dir {folder} is not a folder; pass the folder that holds your models")
    found = []
    for index, entry in enumerate(sorted(folder.iterdir())):
        if index >= MAX_LISTED:
            break
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in MODEL_SUFFIXES:
            found.append(entry)
        elif entry.is_dir() and (entry / "saved_model.pb").is_file():
            found.append(entry)
    return found
