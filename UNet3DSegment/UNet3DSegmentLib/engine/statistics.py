"""Per-class figures of a segmentation: voxel count, volume, input intensities, model confidence.

One implementation feeds every front end: ``segment --statistics PATH`` (CSV or JSON), the ``done``
progress event (``"statistics": [...]``, shown by the Slicer panel and the web page) and batch's
results table. Every figure is computed in linear time with ``np.bincount`` over the labelmap, slab
by slab along z so temporaries stay small; no class costs a pass of its own.

Rows, one per non-background class of the card, in label order::

    {"label": 1, "name": "CSF", "voxels": 1234, "volume_ml": 1.234,
     "mean_T1": 81.2, "std_T1": 10.3,      # per input channel, when images are given
     "confidence": 0.93}                   # when probabilities are given

Means, standard deviations and confidence of an empty class are ``None`` (empty CSV cells, JSON
``null``); non-finite input voxels (NaN, Inf) are left out of the means and standard deviations.
Standard deviations are population ones (``numpy.std``, ddof 0), computed in two passes (mean
first, then squared deviations) so they stay exact for large intensities.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..base.errors import BadInputError

CUBIC_MM_PER_ML = 1000.0
SLAB_VOXELS = 1 << 22  # voxels per slab (4 Mi): temporaries of a few tens of MB at most
STATISTICS_SUFFIXES = (".csv", ".json")
BASE_COLUMNS = ("label", "name", "voxels", "volume_ml")

Row = Dict[str, Any]


def _channel_names(card: Any, count: int) -> List[str]:
    names = list(getattr(getattr(card, "input", None), "channels", ()) or ())
    if len(names) != count:  # not the card's channels: numbered
        names = [f"channel{index}" for index in range(count)]
    return [str(name) for name in names]


def _class_names(card: Any) -> List[str]:
    names = getattr(card, "class_names", None)
    if names is None:
        names = [c.name for c in card.classes]
    return [str(n) for n in names]


def _probabilities_zyxk(probabilities: np.ndarray, shape: tuple, classes: int) -> np.ndarray:
    """``(z, y, x, k)`` (the engine's layout), ``(k, z, y, x)`` as ``(z, y, x, k)``, or ``(z, y, x)`` as is."""
    p = np.asarray(probabilities)
    if p.shape == shape:  # already the probability of each voxel's own label
        return p
    if p.ndim == 4 and p.shape[:3] == shape and p.shape[3] == classes:
        return p
    if p.ndim == 4 and p.shape[0] == classes and p.shape[1:] == shape:
        return np.moveaxis(p, 0, -1)
    raise BadInputError(
        f"probabilities of shape {p.shape} do not match the labelmap {shape} with {classes} classes; "
        "expected (z, y, x, classes)"
    )


def _finite_or_none(value: float) -> Optional[float]:
    """JSON has no NaN: a figure spoilt by non-finite input voxels is reported as missing."""
    return float(value) if math.isfinite(value) else None


def compute_statistics(
    labels: np.ndarray,
    spacing: Sequence[float],
    card: Any,
    images: Optional[Sequence[np.ndarray]] = None,
    probabilities: Optional[np.ndarray] = None,
) -> List[Row]:
    """One row per non-background class of ``card`` (labels 1 .. num_classes - 1), in order.

    ``labels`` is the ``(z, y, x)`` labelmap; ``spacing`` the voxel size in mm (any axis order: only
    its product counts); ``images`` one ``(z, y, x)`` array per input channel of the card, on the
    labelmap's grid; ``probabilities`` ``(z, y, x, classes)`` (or ``(classes, z, y, x)``) on the same
    grid, or ``(z, y, x)``: the probability of each voxel's own label (what the pipeline keeps when
    it builds the labelmap slab by slab). Label values outside the card's classes are not counted.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise BadInputError(f"statistics need a 3D (z, y, x) labelmap, got shape {labels.shape}")
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise BadInputError(f"statistics need 3 positive voxel spacings in mm, got {spacing}")
    names = _class_names(card)
    classes = len(names)
    shape = labels.shape
    images = [np.asarray(image) for image in images] if images is not None else []
    for index, image in enumerate(images):
        if image.shape != shape:
            raise BadInputError(f"channel {index} of shape {image.shape} does not match the labelmap {shape}")
    channels = _channel_names(card, len(images)) if images else []
    probs = _probabilities_zyxk(probabilities, shape, classes) if probabilities is not None else None

    depth, plane = shape[0], shape[1] * shape[2]
    step = max(1, SLAB_VOXELS // max(1, plane))
    counts = np.zeros(classes, dtype=np.int64)
    sums = np.zeros((len(images), classes), dtype=np.float64)
    finite_counts = np.zeros((len(images), classes), dtype=np.int64)  # voxels with a finite value
    confidence = np.zeros(classes, dtype=np.float64)

    def flat_labels(first: int) -> np.ndarray:
        slab = labels[first:first + step].reshape(-1)
        if slab.size and (slab.min() < 0 or slab.max() >= classes):  # foreign values go to a spare bin
            slab = np.where((slab >= 0) & (slab < classes), slab, classes)
        return slab.astype(np.intp, copy=False)

    def count(values: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
        return np.bincount(values, weights=weights, minlength=classes + 1)[:classes]

    def channel_values(image: np.ndarray, first: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """One slab of a channel as float64, non-finite voxels (NaN, Inf) set to 0 and masked out."""
        values = image[first:first + step].reshape(-1).astype(np.float64)
        if np.issubdtype(image.dtype, np.integer):
            return values, None
        finite = np.isfinite(values)
        if finite.all():
            return values, None
        values[~finite] = 0.0
        return values, finite

    for first in range(0, depth, step):
        flat = flat_labels(first)
        slab_counts = count(flat)
        counts += slab_counts
        for c, image in enumerate(images):
            values, finite = channel_values(image, first)
            sums[c] += count(flat, values)
            finite_counts[c] += slab_counts if finite is None else count(flat[finite])
        if probs is not None and probs.ndim == 3:
            confidence += count(flat, probs[first:first + step].reshape(-1).astype(np.float64))
        elif probs is not None:
            slab = probs[first:first + step].reshape(-1, classes)
            picked = np.take_along_axis(slab, np.minimum(flat, classes - 1)[:, None], axis=1)[:, 0]
            confidence += count(flat, picked.astype(np.float64, copy=False))

    means = sums / np.maximum(finite_counts, 1)
    squares = np.zeros_like(sums)
    if images:  # second pass: squared deviations from each class's mean (exact for large values)
        for first in range(0, depth, step):
            flat = flat_labels(first)
            lookup = np.minimum(flat, classes - 1)
            for c, image in enumerate(images):
                values, finite = channel_values(image, first)
                deviation = values - means[c][lookup]
                if finite is not None:
                    deviation[~finite] = 0.0
                squares[c] += count(flat, deviation * deviation)
    stds = np.sqrt(squares / np.maximum(finite_counts, 1))
    confidence /= np.maximum(counts, 1)

    voxel_ml = float(np.prod(spacing)) / CUBIC_MM_PER_ML
    rows: List[Row] = []
    for label in range(1, classes):
        n = int(counts[label])
        row: Row = {"label": label, "name": names[label], "voxels": n, "volume_ml": n * voxel_ml}
        for c, channel in enumerate(channels):
            measured = int(finite_counts[c, label]) > 0
            row[f"mean_{channel}"] = _finite_or_none(means[c, label]) if measured else None
            row[f"std_{channel}"] = _finite_or_none(stds[c, label]) if measured else None
        if probs is not None:
            row["confidence"] = _finite_or_none(confidence[label]) if n else None
        rows.append(row)
    return rows


def statistics_columns(rows: Sequence[Row]) -> List[str]:
    """Column names of ``rows`` in a stable order: label, name, voxels, volume_ml, channels, confidence."""
    columns = list(BASE_COLUMNS)
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    return columns


def statistics_text(rows: Sequence[Row], path: Union[str, Path]) -> str:
    """``rows`` as CSV (``.csv``) or JSON (``.json``) text, chosen by the suffix of ``path``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return json.dumps({"statistics": list(rows)}, indent=2) + "\n"
    if suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=statistics_columns(rows), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else (repr(v) if isinstance(v, float) else v))
                             for k, v in row.items()})
        return buffer.getvalue()
    raise BadInputError(f"--statistics {path}: use a .csv or .json file")


def check_statistics_path(path: Union[str, Path], overwrite: bool) -> Path:
    """Fail early (before inference) unless ``path`` is a writable .csv or .json file; return it absolute."""
    path = Path(path).expanduser().absolute()
    if path.suffix.lower() not in STATISTICS_SUFFIXES:
        raise BadInputError(f"statistics file {path} must end in .csv or .json")
    from .image_io import check_destination

    check_destination(path, "statistics", overwrite, "statistics.csv")
    return path


def statistics_writer(rows: Sequence[Row], path: Union[str, Path]) -> Callable[[Path], None]:
    """A writer for ``image_io.write_outputs`` / ``atomic_write`` (the text is built up front)."""
    text = statistics_text(rows, path)

    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    return write


def write_statistics(rows: Sequence[Row], path: Union[str, Path], overwrite: bool = False) -> Path:
    """Write ``rows`` to ``path`` (CSV or JSON) atomically: a hidden temporary renamed into place."""
    from .image_io import atomic_write

    return atomic_write(path, statistics_writer(rows, path), overwrite)


def read_statistics(path: Union[str, Path]) -> List[Row]:
    """Read a file written by :func:`write_statistics` back into rows (numbers as numbers)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return list(json.loads(text)["statistics"])
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row: Row = {}
        for key, value in raw.items():
            if key == "name":
                row[key] = value
            elif value == "":
                row[key] = None
            elif key in ("label", "voxels"):
                row[key] = int(value)
            else:
                row[key] = float(value)
        rows.append(row)
    return rows
