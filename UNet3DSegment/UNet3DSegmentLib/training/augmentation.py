"""Data augmentation for training: spatial (affine) and intensity transforms, numpy + SimpleITK only.

Two levels share the same building blocks:
- whole volumes (``random_affine_volume``, ``random_bias_field``...): used to make transformed copies
  of a volume, e.g. the demo model's training and evaluation data;
- patches (``PatchAugmenter``): applied to every sampled training patch (flips, intensity
  scale/shift, noise, bias field); small rotations and scaling are applied while the patch is sampled
  (see ``training.PatchSampler``), by resampling the volume through ``random_affine_matrix``.

Everything random draws from a ``numpy.random.Generator`` passed in, so a seed fixes the result.
Arrays are ``(z, y, x)`` (channels last where there are channels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


def rotation_matrix(angles_rad: Sequence[float]) -> np.ndarray:
    """3x3 rotation about the x, then y, then z axis (physical x, y, z order)."""
    ax, ay, az = angles_rad
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_affine_matrix(
    rng: np.random.Generator, max_rotation_deg: float, scale_range: tuple[float, float]
) -> np.ndarray:
    """A random 3x3 matrix: rotation (uniform angle per axis within +-max) times per-axis scaling."""
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, size=3))
    scales = rng.uniform(scale_range[0], scale_range[1], size=3)
    return rotation_matrix(angles) @ np.diag(scales)


def random_affine_transform(
    reference: Any,
    rng: np.random.Generator,
    max_rotation_deg: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    max_translation_mm: float = 5.0,
) -> Any:
    """A random ``sitk.AffineTransform`` about the centre of ``reference`` (rotation, scaling, shift)."""
    import SimpleITK as sitk

    size = np.array(reference.GetSize())
    centre = reference.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in (size - 1) / 2.0))
    transform = sitk.AffineTransform(3)
    transform.SetCenter(centre)
    transform.SetMatrix(tuple(random_affine_matrix(rng, max_rotation_deg, scale_range).flatten()))
    transform.SetTranslation(tuple(rng.uniform(-max_translation_mm, max_translation_mm, size=3)))
    return transform


def random_affine_volume(
    image: Any,
    labels: Any,
    rng: np.random.Generator,
    max_rotation_deg: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    max_translation_mm: float = 5.0,
) -> tuple[Any, Any]:
    """Resample ``image`` (linear) and ``labels`` (nearest) through one random affine about the centre.

    Both are SimpleITK images on the same grid; the outputs keep that grid, with 0 outside.
    """
    import SimpleITK as sitk

    transform = random_affine_transform(image, rng, max_rotation_deg, scale_range, max_translation_mm)
    moved = sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0, image.GetPixelID())
    moved_labels = sitk.Resample(labels, labels, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return moved, moved_labels


def smooth_field(shape: Sequence[int], rng: np.random.Generator, strength: float, order: int = 2) -> np.ndarray:
    """A smooth multiplicative field ``exp(polynomial)`` over ``shape`` with values around 1.

    The polynomial has random coefficients up to ``order`` in normalised coordinates [-1, 1]; its
    amplitude is about ``strength`` (0.3 gives roughly +-30 % intensity change across the volume).
    """
    axes = [np.linspace(-1.0, 1.0, int(n), dtype=np.float32) for n in shape]
    log_field = np.zeros(tuple(int(n) for n in shape), dtype=np.float32)
    terms = [(i, j, k) for i in range(order + 1) for j in range(order + 1) for k in range(order + 1)
             if 0 < i + j + k <= order]
    coefficients = rng.uniform(-1.0, 1.0, size=len(terms)) * strength / np.sqrt(len(terms))
    for (i, j, k), c in zip(terms, coefficients):
        log_field += np.float32(c) * (axes[0][:, None, None] ** i) * (axes[1][None, :, None] ** j) * (
            axes[2][None, None, :] ** k
        )
    return np.exp(log_field)


def random_bias_field(array: np.ndarray, rng: np.random.Generator, strength: float = 0.3) -> np.ndarray:
    """Multiply ``array`` (z, y, x) by a smooth random bias field (MRI intensity inhomogeneity)."""
    return (array * smooth_field(array.shape, rng, strength)).astype(np.float32)


def random_gamma(array: np.ndarray, rng: np.random.Generator, gamma_range=(0.8, 1.25), mask=None) -> np.ndarray:
    """Contrast change: ``max * (x / max) ** gamma`` on non-negative intensities (inside ``mask``)."""
    gamma = rng.uniform(*gamma_range)
    top = float(array.max()) or 1.0
    out = array.astype(np.float32).copy()
    region = out > 0 if mask is None else mask
    out[region] = top * (np.clip(out[region], 0, None) / top) ** gamma
    return out


def add_noise(array: np.ndarray, rng: np.random.Generator, sigma: float, mask=None) -> np.ndarray:
    """Add Gaussian noise of standard deviation ``sigma`` (everywhere, or inside ``mask`` only)."""
    noise = rng.normal(0.0, sigma, size=array.shape).astype(np.float32)
    if mask is not None:
        noise *= mask
    return (array + noise).astype(np.float32)


def random_background_noise(
    array: np.ndarray,
    rng: np.random.Generator,
    sigma_range: tuple[float, float] = (0.0, 0.08),
    offset_range: tuple[float, float] = (0.0, 0.02),
) -> np.ndarray:
    """Fill the background of a raw image (voxels exactly 0) with ``|offset + N(0, sigma)|``.

    ``sigma`` and ``offset`` are drawn uniformly from their ranges, in units of the mean of the non-zero
    (brain) voxels; non-zero voxels are left unchanged. The absolute value mimics the non-negative
    (Rician) background of a magnitude MR image. Apply it to the raw image *before* the engine's
    preprocessing: a non-zero background changes ``zscore-nonzero``'s statistics and removes
    ``crop_to_nonzero``'s crop, which is exactly what a model sees at inference on such an image.
    """
    out = np.asarray(array, dtype=np.float32).copy()
    background = out == 0
    foreground = out[~background]
    level = float(np.abs(foreground).mean()) if foreground.size else 1.0
    sigma = float(rng.uniform(*sigma_range)) * level
    offset = float(rng.uniform(*offset_range)) * level
    out[background] = np.abs(offset + rng.normal(0.0, sigma, size=int(background.sum()))).astype(np.float32)
    return out


@dataclass(frozen=True)
class AugmentationConfig:
    """Probabilities and ranges of the per-patch augmentations (all off when ``enabled`` is False)."""

    enabled: bool = True
    flip_axes: tuple[int, ...] = (0, 1, 2)  # (z, y, x) axes that may be flipped, each with p = 0.5
    rotation_probability: float = 0.2
    max_rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    intensity_probability: float = 0.5
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    intensity_shift: float = 0.1  # in units of the normalised intensity (standard deviations)
    noise_probability: float = 0.2
    noise_sigma: tuple[float, float] = (0.0, 0.1)
    bias_probability: float = 0.2
    bias_strength: float = 0.3
    # Volume level, on raw images before preprocessing (``random_background_noise``), not per patch:
    # the share of training volumes that also enter training with their zero background replaced by
    # |offset + noise| (sigma and offset in units of the brain's mean intensity), so that a noisy
    # background is not mistaken for tissue. ``PatchAugmenter`` ignores these fields; the demo model's
    # training applies them (scripts/train_demo_model.py --background-noise-probability, with
    # ``demo.background_noise_twins`` and ``demo.with_random_background_noise``). Off by default.
    background_noise_probability: float = 0.0
    background_noise_sigma: tuple[float, float] = (0.0, 0.08)
    background_offset: tuple[float, float] = (0.0, 0.02)


class PatchAugmenter:
    """Applies ``AugmentationConfig``'s flips and intensity transforms to one (patch, labels) pair."""

    def __init__(self, config: AugmentationConfig) -> None:
        self.config = config

    def __call__(
        self, patch: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``patch`` is (z, y, x, c) float32, ``labels`` (z, y, x); returns augmented copies.

        Flips move image and labels together; intensity transforms leave zero voxels at zero.
        """
        c = self.config
        if not c.enabled:
            return patch, labels
        for axis in c.flip_axes:
            if rng.random() < 0.5:
                patch = np.flip(patch, axis=axis)
                labels = np.flip(labels, axis=axis)
        patch = np.ascontiguousarray(patch, dtype=np.float32)
        labels = np.ascontiguousarray(labels)
        # Intensity changes touch only non-zero voxels: "zscore-nonzero" keeps the background at
        # exactly 0 at inference, so training must too.
        inside = (patch != 0).astype(np.float32)
        if rng.random() < c.bias_probability:
            field = smooth_field(patch.shape[:3], rng, c.bias_strength)
            patch = patch * (1.0 + (field[..., None] - 1.0) * inside)
        if rng.random() < c.intensity_probability:
            scale = rng.uniform(*c.intensity_scale, size=patch.shape[-1]).astype(np.float32)
            shift = rng.uniform(-c.intensity_shift, c.intensity_shift, size=patch.shape[-1]).astype(np.float32)
            patch = patch + ((patch * scale + shift) - patch) * inside
        if rng.random() < c.noise_probability:
            patch = add_noise(patch, rng, float(rng.uniform(*c.noise_sigma)), mask=inside)
        return patch.astype(np.float32), labels
