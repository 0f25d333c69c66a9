"""Training data: find image/label pairs, check them, and preprocess them exactly as inference will.

Two layouts are understood:
- a folder with ``imagesTr/`` and ``labelsTr/`` (Medical Segmentation Decathlon / nnU-Net raw): images
  ``<case>.nii.gz`` or, nnU-Net style, one file per channel ``<case>_0000.nii.gz``, ``<case>_0001...``;
  labels ``<case>.nii.gz``;
- a CSV file with a header: one or more image columns (channels, in the card's order) and a column
  named ``label``; relative paths are relative to the CSV's folder.

``load_case`` reads one pair, rejects mismatched geometry, non-integer labels and labels outside the
class range (naming the file), and runs the same ``preprocessing.prepare`` as inference, mapping the
labels onto the prepared grid (nearest neighbour), so training sees what the sliding window will see.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from ..base.errors import BadInputError
from .loop import TrainingCase

PathLike = Union[str, Path]
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_CHANNEL_PATTERN = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class ImagePair:
    """One training case: its channel files (in order) and its label file."""

    name: str
    images: tuple[Path, ...]
    label: Path


def _strip_suffix(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return ""


def _image_files(folder: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.iterdir()):
        stem = _strip_suffix(path)
        if stem and not path.name.startswith("."):
            files[stem] = path
    return files


def find_pairs(source: PathLike, channels: int = 1) -> list[ImagePair]:
    """Image/label pairs from an ``imagesTr/`` + ``labelsTr/`` folder or a CSV file, sorted by name."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return pairs_from_csv(source, channels)
    if source.is_dir():
        return pairs_from_folder(source, channels)
    raise BadInputError(
        f"training data {source} is neither a folder with imagesTr/ and labelsTr/ nor a .csv file; check the path"
    )


def pairs_from_folder(folder: Path, channels: int = 1) -> list[ImagePair]:
    """Pairs of the Decathlon / nnU-Net raw layout; BadInputError naming any image without a label."""
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise BadInputError(f"{folder} must hold the folders imagesTr/ and labelsTr/ (Decathlon / nnU-Net layout)")
    images, labels = _image_files(images_dir), _image_files(labels_dir)
    cases: dict[str, dict[int, Path]] = {}
    for stem, path in images.items():
        match = _CHANNEL_PATTERN.match(stem)
        if match and stem not in labels:
            cases.setdefault(match["case"], {})[int(match["channel"])] = path
        else:
            cases.setdefault(stem, {})[0] = path
    if not cases:
        raise BadInputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
    missing = [name for name in sorted(cases) if name not in labels]
    if missing:
        shown = ", ".join(str(cases[m][min(cases[m])].name) for m in missing[:5])
        raise BadInputError(
            f"{len(missing)} image(s) in {images_dir} have no label in {labels_dir} ({shown}"
            f"{', ...' if len(missing) > 5 else ''}); add <case>.nii.gz label files or remove the images"
        )
    pairs = []
    for name in sorted(cases):
        found = cases[name]
        if sorted(found) != list(range(channels)):
            raise BadInputError(
                f"case {name} in {images_dir} has channel files {sorted(found)} but the model takes {channels} "
                f"channel(s) (expected _0000 .. _{channels - 1:04d})"
            )
        pairs.append(ImagePair(name, tuple(found[c] for c in range(channels)), labels[name]))
    return pairs


def pairs_from_csv(path: Path, channels: int = 1) -> list[ImagePair]:
    """Pairs listed in a CSV with image column(s) and a ``label`` column."""
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BadInputError(f"cannot read the CSV {path} ({error}); check the file") from error
    if not rows:
        raise BadInputError(f"the CSV {path} lists no cases; add a header and one row per case")
    columns = [c for c in rows[0] if c is not None]
    if "label" not in columns:
        raise BadInputError(f"the CSV {path} needs a column named 'label' (found: {', '.join(columns)})")
    image_columns = [c for c in columns if c != "label" and c.lower() != "name"]
    if len(image_columns) != channels:
        raise BadInputError(
            f"the CSV {path} has {len(image_columns)} image column(s) ({', '.join(image_columns)}) but the model "
            f"takes {channels} channel(s)"
        )
    pairs = []
    for number, row in enumerate(rows, start=2):
        def resolve(value: str | None, column: str) -> Path:
            if not value:
                raise BadInputError(f"the CSV {path} line {number} has no {column}; fill it in or remove the row")
            candidate = Path(value)
            return candidate if candidate.is_absolute() else path.parent / candidate

        images = tuple(resolve(row.get(c), c) for c in image_columns)
        label = resolve(row.get("label"), "label")
        name = row.get("name") or _strip_suffix(images[0]) or images[0].name
        for file in (*images, label):
            if not file.exists():
                raise BadInputError(f"the CSV {path} line {number} names {file}, which does not exist")
        pairs.append(ImagePair(name, images, label))
    return pairs


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    """``labels`` as uint8/uint16 if integral and within [0, num_classes); BadInputError otherwise."""
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise BadInputError(f"label file {source} holds non-integer values; labels must be whole numbers")
    low, high = (labels.min(), labels.max()) if labels.size else (0, 0)
    if low < 0 or high >= num_classes:
        bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])[:5]
        raise BadInputError(
            f"label file {source} holds values {', '.join(str(int(v)) for v in bad)} outside 0..{num_classes - 1} "
            f"(the model has {num_classes} classes); fix the labels or name more classes in the card"
        )
    return labels.astype(np.uint8 if num_classes <= 256 else np.uint16)


def prepare_case(name: str, images: Sequence[Any], label: Any, card: Any, label_source: str = "") -> TrainingCase:
    """Preprocess SimpleITK channel ``images`` as the card says and map ``label`` onto the same grid."""
    import SimpleITK as sitk

    from ..engine.preprocessing import Grid, prepare

    source = label_source or f"of case {name}"
    problem = Grid.of(images[0]).difference(Grid.of(label))
    if problem is not None:
        raise BadInputError(
            f"label {source} does not lie on the grid of its image ({problem}); resample the label onto the "
            f"image grid (nearest neighbour) or pass the matching file"
        )
    label = sitk.Image(label)
    label.CopyInformation(images[0])
    prepared = prepare(list(images), card)
    if card.input.orientation != "native":
        label = sitk.DICOMOrient(label, card.input.orientation)
    grid = prepared.working_grid
    if Grid.of(label).difference(grid) is not None:
        label = sitk.Resample(label, grid.size, sitk.Transform(), sitk.sitkNearestNeighbor, grid.origin,
                              grid.spacing, grid.direction, 0, label.GetPixelID())
    array = sitk.GetArrayFromImage(label)
    if prepared.crop is not None:
        array = array[prepared.crop]
    return TrainingCase(name, prepared.array, check_labels(array, card.num_classes, source))


def load_case(pair: ImagePair, card: Any) -> TrainingCase:
    """Read a pair's files (``image_io``) and ``prepare_case`` them."""
    from ..engine.image_io import read_channels, read_image

    images = read_channels(list(pair.images))
    label = read_image(pair.label)
    return prepare_case(pair.name, images, label, card, label_source=str(pair.label))


def split_pairs(pairs: Sequence[ImagePair], validation_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle with ``seed`` and hold out ``validation_fraction`` (at least one case if there are two)."""
    if not 0.0 <= validation_fraction < 1.0:
        raise BadInputError(f"validation fraction must be >= 0 and < 1, got {validation_fraction}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    count = int(round(len(pairs) * validation_fraction))
    if validation_fraction > 0 and count == 0 and len(pairs) >= 2:
        count = 1
    validation = [pairs[i] for i in sorted(order[:count])]
    training = [pairs[i] for i in sorted(order[count:])]
    return training, validation
