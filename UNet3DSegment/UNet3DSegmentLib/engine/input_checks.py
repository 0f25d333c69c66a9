"""Checks of an input against what its model expects; each mismatch is a warning, never a refusal.

The model card's optional ``input.expect`` section (``card.InputExpectation``) says what the model
was made for: a zero background, a skull-stripped brain, plausible intensity percentiles, a spacing
range. Before inference the pipeline calls :func:`check_images` and emits every message it returns
as a ``warning`` progress event (command-line stderr, JSON line, Slicer panel, web page), then runs
anyway. Two silent failures motivated it: a skull-stripped T1 whose background carries a few percent
of noise gets the whole background labelled grey matter, and a head that is not skull-stripped gets
skull and scalp labelled brain tissue.

Geometry checks run for every card (a damaged direction matrix, an identity direction with strongly
anisotropic spacing, a spacing far from the card's resampling target); the intensity and the other
geometry checks only run for cards with an ``expect`` section.

Everything here is a pure function of arrays (``(z, y, x)``), spacing and direction (ITK ``(x, y, z)``
order) and the card, in linear time; large volumes are checked on a strided sample of at most
``SAMPLE_VOXELS`` voxels (fractions, percentiles and volumes stay accurate to well under 1 %).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence

import numpy as np

SAMPLE_VOXELS = 16 * 1024 * 1024
FOREGROUND_LEVEL = 0.10  # foreground: above this share of the 99.5th percentile of the non-zero voxels
ANISOTROPY = 2.5  # identity direction with a thick axis at least this many times the thinnest: suspicious
RESAMPLING_FACTOR = 4.0  # input spacing this many times off the card's resampling target: suspicious
ORTHONORMAL_TOLERANCE = 1e-3


def _fmt(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def _sample(array: np.ndarray) -> tuple[np.ndarray, int]:
    """``array`` (a view) strided so that it holds at most ``SAMPLE_VOXELS`` voxels, and the stride."""
    stride = 1
    while array[::stride, ::stride, ::stride].size > SAMPLE_VOXELS:
        stride += 1
    return array[::stride, ::stride, ::stride], stride


def check_geometry(spacing: Sequence[float], direction: Sequence[float], card: Any,
                   origin: Optional[Sequence[float]] = None) -> List[str]:
    """Warnings about an implausible header: direction matrix, spacing, lost geometry."""
    warnings: List[str] = []
    spacing = [float(s) for s in spacing]
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(matrix.T @ matrix, np.eye(3), atol=ORTHONORMAL_TOLERANCE):
        warnings.append(
            "direction matrix is not a rotation (its axes are not orthogonal unit vectors): the header is "
            "damaged and the orientation cannot be trusted; fix the file's orientation (re-export it from the "
            "original DICOM) before segmenting")
    anisotropy = max(spacing) / min(spacing) if min(spacing) > 0 else math.inf
    magnitudes = np.abs(matrix)  # axis-aligned: each axis along one anatomical axis (any order, any sign)
    axis_aligned = bool(np.allclose(np.sort(magnitudes, axis=1), [0.0, 0.0, 1.0], atol=1e-6)
                        and np.allclose(magnitudes.sum(axis=0), 1.0, atol=1e-6))
    # Identity in ITK's LPS, or in RAS (what ITK reads from a NIfTI written with an identity affine).
    identity = any(np.allclose(matrix, np.diag(d), atol=1e-6) for d in ((1.0, 1.0, 1.0), (-1.0, -1.0, 1.0)))
    if identity and anisotropy >= ANISOTROPY:
        warnings.append(
            f"orientation may be lost: identity direction with anisotropic spacing {_fmt(spacing)} mm is what "
            "a conversion that dropped the orientation leaves; unless the slices really lie along the "
            "left-right, front-back and up-down axes as stored, left/right and the slice axis are mislabelled. "
            "Compare with the original scan, or convert the DICOM series again (dcm2niix, Slicer)")
    target = getattr(card.input, "spacing", "native")
    if not isinstance(target, str):
        factors = [s / t for s, t in zip(spacing, target)]
        if any(f > RESAMPLING_FACTOR or f < 1.0 / RESAMPLING_FACTOR for f in factors):
            warnings.append(
                f"spacing {_fmt(spacing)} mm is far from the {_fmt(target)} mm model {card.name} resamples to "
                f"(more than {RESAMPLING_FACTOR:g}x on an axis): check the header's spacing (mm, not cm or "
                "voxels); the result may be coarse or wrong")
    expect = getattr(card.input, "expect", None)
    if expect is None:
        return warnings
    if expect.spacing is not None:
        low, high = expect.spacing
        if any(s < low or s > high for s in spacing):
            warnings.append(
                f"spacing {_fmt(spacing)} mm is outside the {low:g}-{high:g} mm model {card.name} expects: "
                f"resample the volume to that resolution first (e.g. Slicer's Resample Scalar Volume), or use "
                "a model made for this resolution; the result may be unreliable")
    at_origin = origin is not None and np.allclose(np.asarray(origin, dtype=np.float64), 0.0)
    if at_origin and axis_aligned and np.allclose(spacing, 1.0):
        warnings.append(
            "header looks lost: spacing exactly 1 x 1 x 1 mm, origin 0 and an axis-aligned direction are "
            "the defaults of a file written without its geometry, so sizes, volumes and left/right may be "
            "wrong; re-export the scan with its geometry (from the original DICOM)")
    return warnings


def check_channel(array: np.ndarray, spacing: Sequence[float], card: Any, channel: str) -> List[str]:
    """Warnings about one channel's voxels against ``card.input.expect`` (none without it)."""
    expect = getattr(card.input, "expect", None)
    if expect is None:
        return []
    full = np.asarray(array)
    data, stride = _sample(full)
    scale = full.size / max(1, data.size)  # voxels each sampled one stands for (exact at the edges too)
    warnings: List[str] = []
    what = f"{expect.modality} " if expect.modality else ""
    finite = data[np.isfinite(data)] if not np.issubdtype(data.dtype, np.integer) else data.reshape(-1)
    if finite.size == 0:
        return [f"channel {channel}: no finite voxel; check the file"]
    clearing = getattr(card.input, "background", None)  # voxels the engine itself sets to 0 (card.BackgroundSpec)
    if clearing is not None:
        from .preprocessing import background_level  # the level the engine clears with, computed one way

        level = background_level(finite, clearing.below)
        zero_fraction = float(np.count_nonzero((finite < level) | (finite == 0))) / finite.size
        counted = f"0 or below {level:.3g} ({clearing.below:.0%} of the 99th percentile, cleared as background)"
    else:
        zero_fraction = float(np.count_nonzero(finite == 0)) / finite.size
        counted = "exactly 0"
    if expect.background_zero and zero_fraction < expect.min_zero_fraction:
        warnings.append(
            f"channel {channel}: background is not zero: only {zero_fraction:.1%} of the voxels are {counted}, "
            f"but model {card.name} expects a {what}input whose background is set to 0 (at least "
            f"{expect.min_zero_fraction:.0%} of the voxels); noise or a non-zero background may be labelled as "
            "tissue. Set every voxel outside the object to 0 (multiply by a brain mask, or skull-strip) "
            "before segmenting")
    nonzero = finite[finite != 0]
    if nonzero.size:
        top = float(np.percentile(nonzero, 99.5))
        foreground = finite[finite > FOREGROUND_LEVEL * top] if top > 0 else finite[:0]
        voxel_ml = float(np.prod([float(s) for s in spacing])) * scale / 1000.0
        foreground_ml = foreground.size * voxel_ml
        low, high = expect.foreground_ml if expect.foreground_ml is not None else (0.0, math.inf)
        if expect.skull_stripped and expect.foreground_ml is None:
            from .card import SKULL_STRIPPED_MAX_ML

            high = SKULL_STRIPPED_MAX_ML
        if foreground_ml > high and expect.skull_stripped:
            warnings.append(
                f"channel {channel}: looks not skull-stripped: its foreground covers {foreground_ml:.0f} mL, more "
                f"than the {high:.0f} mL of a brain alone, and model {card.name} expects a skull-stripped "
                f"{what}input: skull and scalp may be labelled as brain tissue. Skull-strip it first (e.g. "
                "SynthStrip, HD-BET or FSL BET) and set everything outside the brain to 0")
        elif not low <= foreground_ml <= high:
            warnings.append(
                f"channel {channel}: foreground covers {foreground_ml:.0f} mL, outside the {low:g}-{high:g} mL "
                f"model {card.name} expects: check that the volume shows what the model segments and that "
                "its spacing is right")
        if expect.relative_percentiles and foreground.size:
            median = float(np.median(foreground))
            percentiles = [p for p, _, _ in expect.relative_percentiles]
            values = np.percentile(foreground, percentiles) / median if median > 0 else [math.nan] * len(percentiles)
            off = [(p, lo, hi, v) for (p, lo, hi), v in zip(expect.relative_percentiles, values) if not lo <= v <= hi]
            if off:
                figures = ", ".join(
                    f"percentile {p:g}{' of the foreground' if index == 0 else ''} is {v:.2f} x "
                    f"{'its median ' if index == 0 else ''}(expected {lo:g}-{hi:g})"
                    for index, (p, lo, hi, v) in enumerate(off))
                warnings.append(
                    f"channel {channel}: intensities unlike the model's input: {figures} for model {card.name}"
                    f"{' (' + expect.modality + ')' if expect.modality else ''}: check that this is the right kind "
                    "of scan for the channel (e.g. T1, not T2 or FLAIR) and not a mask or labelmap")
    if expect.intensity_percentiles:
        percentiles = [p for p, _, _ in expect.intensity_percentiles]
        values = np.percentile(finite, percentiles)
        off = [(p, lo, hi, v) for (p, lo, hi), v in zip(expect.intensity_percentiles, values) if not lo <= v <= hi]
        if off:
            figures = ", ".join(f"percentile {p:g} is {v:.4g} (expected {lo:g} to {hi:g})" for p, lo, hi, v in off)
            warnings.append(
                f"channel {channel}: intensities unlike the model's input: {figures} for model {card.name}: check "
                "the modality and the intensity units (e.g. CT in Hounsfield units, a missing rescale slope)")
    return warnings


def check_input(arrays: Sequence[np.ndarray], spacing: Sequence[float], direction: Sequence[float], card: Any,
                origin: Optional[Sequence[float]] = None) -> List[str]:
    """Every warning for the channels ``arrays`` (``(z, y, x)``, one per card channel) of one volume."""
    warnings = check_geometry(spacing, direction, card, origin)
    names = list(card.input.channels)
    for index, array in enumerate(arrays):
        name = names[index] if index < len(names) else str(index)
        warnings += check_channel(array, spacing, card, name)
    return warnings


def check_images(images: Sequence[Any], card: Any) -> List[str]:
    """:func:`check_input` for SimpleITK images (one per channel; they share one grid)."""
    import SimpleITK as sitk

    if not images or any(image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1
                         for image in images):
        return []  # not a 3D scalar volume: preprocessing refuses it with its own message
    first = images[0]
    return check_input([sitk.GetArrayViewFromImage(image) for image in images], first.GetSpacing(),
                       first.GetDirection(), card, first.GetOrigin())
