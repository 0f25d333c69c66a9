"""Where the sliding window's tiles go: tile starts per axis and over a volume, batches of starts, padding.

Axis order: volumes are ``(z, y, x)`` (channels last where there are channels); a patch size is a
``(z, y, x)`` 3-tuple. Tiles are listed z slowest, x fastest (C order), which the z-slab accumulator
relies on. Pure numpy.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from ..base.errors import BadInputError
from ..base.options import SegmentOptions

Start = Tuple[int, int, int]


def validate_patch(patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Return ``patch_size`` as a 3-tuple of positive ints (z, y, x), or raise BadInputError."""
    try:
        patch = tuple(int(p) for p in patch_size)
        exact = all(int(p) == p for p in patch_size)
    except (TypeError, ValueError) as error:
        raise BadInputError(
            f"patch size must be three positive integers (z, y, x), got {patch_size!r}"
        ) from error
    if len(patch) != 3 or not exact or any(p < 1 for p in patch):
        raise BadInputError(
            f"patch size must be three positive integers (z, y, x), got {tuple(patch_size)!r}"
        )
    return patch  # type: ignore[return-value]


def validate_mirror_axes(mirror_axes: Optional[Sequence[int]]) -> tuple[int, ...]:
    """Return the sorted, de-duplicated spatial axes to mirror (subset of 0, 1, 2), else raise."""
    if mirror_axes is None:
        return ()
    try:
        axes = tuple(sorted({int(a) for a in mirror_axes}))
    except (TypeError, ValueError) as error:
        raise BadInputError(
            f"mirror axes must be a subset of (0, 1, 2) (z, y, x), got {mirror_axes!r}"
        ) from error
    if any(a not in (0, 1, 2) for a in axes):
        raise BadInputError(
            f"mirror axes must be a subset of (0, 1, 2) (z, y, x), got {tuple(mirror_axes)!r}"
        )
    return axes


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced tile starts along one axis, from 0 to flush with the far edge.

    The largest allowed step is ``floor(patch * (1 - overlap))`` voxels (at least 1), so
    neighbouring tiles always overlap by at least ``overlap``; the number of tiles is the fewest
    that allows it, and the integer starts are spread evenly (rounded; no step exceeds the allowed
    one). The last start is ``size - patch``; an axis no longer than the patch gets the start 0.
    """
    if overlap is None:
        raise BadInputError("overlap must be a number >= 0 and < 1, got None")
    overlap = SegmentOptions.spec("overlap").check(overlap)
    size, patch = int(size), int(patch)
    if patch < 1 or size < 1:
        raise BadInputError(f"size and patch must be positive, got size {size}, patch {patch}")
    if size <= patch:
        return [0]
    span = size - patch
    # 1e-9 guards against 64 * (1 - 0.9) = 6.3999... style float error dropping a whole voxel.
    max_step = max(1, math.floor(patch * (1.0 - overlap) + 1e-9))
    intervals = -(-span // max_step)  # ceil
    # i * span / intervals rounded half up: consecutive steps differ by at most one voxel.
    return [(2 * i * span + intervals) // (2 * intervals) for i in range(intervals + 1)]


def grid_starts(
    shape_zyx: Sequence[int], patch_size: Sequence[int], overlap: float
) -> list[Start]:
    """All tile starts ``(z, y, x)`` of a volume, z slowest, x fastest (C order)."""
    patch = validate_patch(patch_size)
    shape = tuple(int(s) for s in shape_zyx)
    if len(shape) != 3:
        raise BadInputError(f"volume shape must be three sizes (z, y, x), got {tuple(shape_zyx)!r}")
    per_axis = [tile_starts(s, p, overlap) for s, p in zip(shape, patch)]
    return list(itertools.product(*per_axis))  # type: ignore[arg-type]


def count_patches(shape_zyx: Sequence[int], patch_size: Sequence[int], overlap: float) -> int:
    """Number of tiles :func:`grid_starts` yields (one predictor pass, without test-time flips)."""
    patch = validate_patch(patch_size)
    return math.prod(
        len(tile_starts(s, p, overlap)) for s, p in zip(tuple(int(s) for s in shape_zyx), patch)
    )


def iter_batches(starts: Sequence[Start], batch_size: int) -> Iterator[Sequence[Start]]:
    """Consecutive groups of at most ``batch_size`` tile starts."""
    for first in range(0, len(starts), batch_size):
        yield starts[first:first + batch_size]


def empty_tiles(image: np.ndarray, starts: Sequence[Start], patch: tuple[int, int, int]) -> list[bool]:
    """For each tile, whether its input is zero in every voxel and channel.

    After the crop to the non-zero box (and ``zscore-nonzero``, which keeps zeros at 0) such tiles hold
    only background, typically the corners of the box around a brain; the model need not see them.
    """
    pz, py, px = patch
    return [not image[z:z + pz, y:y + py, x:x + px].any() for z, y, x in starts]


def tile_units(starts: Sequence[Start], empty: Sequence[bool], batch_size: int) -> list[tuple[bool, list[Start]]]:
    """Split ``starts`` (in order) into runs of at most ``batch_size`` tiles that are all empty or all not.

    ``(is_empty, starts)`` per run, in the tiles' C order, so that the z-slab accumulator receives every
    tile in order whether the model runs on it or it counts as background. Each run is at most
    ``batch_size`` consecutive starts, which ``accumulator.ring_depth`` bounds.
    """
    units: list[tuple[bool, list[Start]]] = []
    for start, is_empty in zip(starts, empty):
        if units and units[-1][0] == bool(is_empty) and len(units[-1][1]) < batch_size:
            units[-1][1].append(start)
        else:
            units.append((bool(is_empty), [start]))
    return units


def pad_to_patch(
    image: np.ndarray, patch: tuple[int, int, int]
) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Zero-pad axes shorter than the patch, image centred; return it and the crop back.

    An image at least as large as the patch on every axis is returned as is (no copy).
    """
    shape = image.shape[:3]
    if all(s >= p for s, p in zip(shape, patch)):
        return image, (slice(None), slice(None), slice(None))
    before = [max(p - s, 0) // 2 for s, p in zip(shape, patch)]
    after = [max(p - s, 0) - b for s, p, b in zip(shape, patch, before)]
    padded = np.pad(image, list(zip(before, after)) + [(0, 0)], mode="constant")
    crop = tuple(slice(b, b + s) for b, s in zip(before, shape))
    return padded, crop  # type: ignore[return-value]
