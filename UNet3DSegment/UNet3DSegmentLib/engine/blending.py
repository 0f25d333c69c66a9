"""How much each voxel of a tile counts when overlapping tiles are averaged (the importance map).

Pure numpy. The blending modes are the ``blend`` option's choices (``base/options.py``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from ..base.options import SegmentOptions
from .tiling import validate_patch

GAUSSIAN_SIGMA_SCALE = 1.0 / 8.0  # sigma = patch side / 8 per axis (as nnU-Net)
# Smallest blending weight with float16 sums: the Gaussian's ~1e-11 corners would underflow float16
# (smallest value ~6e-8) and leave voxels that only tile corners cover at 0 instead of their value.
FLOAT16_MIN_WEIGHT = 1.0 / 1024.0


def importance_map(patch_size: Sequence[int], blend: str = "gaussian") -> np.ndarray:
    """Per-voxel blending weight of a tile, float32 ``(pz, py, px)``, read-only and cached.

    ``"constant"``: all ones (plain averaging). ``"gaussian"``: a separable Gaussian centred on the
    tile (at ``(p - 1) / 2``, so it is mirror-symmetric) with sigma = side / 8 per axis, maximum 1;
    the tile border, where the network sees least context, counts least. Values are clamped to the
    smallest positive value so that no voxel ever gets weight 0 (every voxel is covered by a tile).
    """
    return _importance_map_cached(validate_patch(patch_size), SegmentOptions.spec("blend").check(blend))


@lru_cache(maxsize=8)
def _importance_map_cached(patch: tuple[int, int, int], blend: str) -> np.ndarray:
    if blend == "constant":
        weights = np.ones(patch, dtype=np.float32)
    else:
        weights = gaussian_weights(patch, GAUSSIAN_SIGMA_SCALE)
    weights.setflags(write=False)
    return weights


def gaussian_weights(patch: tuple[int, int, int], sigma_scale: float) -> np.ndarray:
    """Separable Gaussian, sigma = side * ``sigma_scale``, max 1, zeros raised to the least value.

    With sigma = side / 8 nothing underflows (corners are ~4 sigma out per axis, ~4e-11); the clamp
    guards narrower Gaussians, where a zero weight would leave tile corners undefined.
    """
    profiles = []
    for side in patch:
        offset = np.arange(side, dtype=np.float64) - (side - 1) / 2.0
        profile = np.exp(-0.5 * (offset / (side * sigma_scale)) ** 2)
        profiles.append(profile / profile.max())
    weights = np.multiply.outer(np.multiply.outer(profiles[0], profiles[1]), profiles[2])
    weights = weights.astype(np.float32)
    positive = weights > 0
    if not positive.all():
        weights[~positive] = weights[positive].min()
    return weights


def tile_weights(patch_size: Sequence[int], blend: str, accumulation: str) -> np.ndarray:
    """The importance map a run blends with: :func:`importance_map`, for float16 sums raised to at
    least :data:`FLOAT16_MIN_WEIGHT` (so no weight underflows). Read-only."""
    weights = importance_map(patch_size, blend)
    if SegmentOptions.spec("accumulation").check(accumulation) == "float16":
        weights = np.maximum(weights, np.float32(FLOAT16_MIN_WEIGHT))
        weights.setflags(write=False)
    return weights
