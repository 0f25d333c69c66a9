"""From probabilities to a labelmap and clean-up of stray islands (Dice overlap: ``metrics``).

Arrays are ``(z, y, x)`` labelmaps (probabilities ``(z, y, x, k)`` channels-last); label value ``i``
is output channel ``i`` of the model, 0 being the background. Connected components use SimpleITK
(scipy is not a dependency).
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from ..base.errors import BadInputError
from .metrics import dice, dice_per_class  # noqa: F401  (callers import Dice from here too)

_ARGMAX_SLAB_VOXELS = 1 << 20  # argmax a slab at a time so the int64 temporary stays ~8 MB


def label_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned dtype holding labels ``0 .. num_classes - 1`` (uint8 up to 256 classes)."""
    if num_classes < 1:
        raise BadInputError(f"number of classes must be >= 1, got {num_classes}")
    return np.dtype(np.min_scalar_type(num_classes - 1))


def labels_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """Label of the most probable class at every voxel: argmax over the last axis.

    Ties go to the lowest label (so an all-equal voxel is background). The result is uint8 for up
    to 256 classes, uint16 beyond. Worked through in slabs along the first axis, so the argmax
    temporary stays small even for large volumes.
    """
    array = np.asarray(probs)
    if array.ndim < 2 or array.shape[-1] < 1:
        raise BadInputError(
            f"probabilities must be (..., classes) with at least one class, got shape {array.shape}"
        )
    labels = np.empty(array.shape[:-1], dtype=label_dtype(array.shape[-1]))
    per_row = max(1, int(np.prod(array.shape[1:])))
    step = max(1, _ARGMAX_SLAB_VOXELS // per_row)
    for first in range(0, array.shape[0], step):
        labels[first:first + step] = np.argmax(array[first:first + step], axis=-1)
    return labels


def keep_largest_component(
    labels: np.ndarray, classes: Optional[Iterable[int]] = None, fully_connected: bool = True
) -> np.ndarray:
    """Keep only the largest connected piece of each class; the other voxels become 0 (background).

    Connectivity is 26-neighbour (``fully_connected=True``, the default): voxels touching by a
    face, an edge or a corner belong together, so thin oblique structures (cortex ribbons, vessels
    running diagonally through anisotropic voxels) are not cut into pieces and partly deleted.
    ``fully_connected=False`` gives 6-neighbour (faces only). ``classes`` defaults to every non-zero
    label present. The size of a piece is its voxel count; of equally large pieces SimpleITK's
    ordering decides. Returns a new array; ``labels`` is not changed.
    """
    import SimpleITK as sitk

    array = np.asarray(labels)
    if array.ndim not in (2, 3) or not np.issubdtype(array.dtype, np.integer):
        raise BadInputError(
            f"labels must be a 2-D or 3-D integer labelmap, got {array.ndim}-D {array.dtype}"
        )
    wanted = sorted(int(c) for c in np.unique(array) if c != 0) if classes is None else classes
    result = array.copy()
    for label in wanted:
        if int(label) == 0:
            continue  # the background is what removed voxels become; it is never trimmed
        mask = array == label
        box = _bounding_box(mask)
        if box is None:
            continue
        inside = mask[box]
        components = sitk.ConnectedComponent(
            sitk.GetImageFromArray(inside.astype(np.uint8)), fully_connected
        )
        ranked = sitk.GetArrayFromImage(sitk.RelabelComponent(components))  # 1 = largest piece
        result[box][inside & (ranked != 1)] = 0
    return result


def _bounding_box(mask: np.ndarray) -> Optional[tuple[slice, ...]]:
    """Smallest box holding every True voxel of ``mask`` (None if there is none)."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)
