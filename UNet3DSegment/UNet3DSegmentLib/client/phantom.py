"""A synthetic skull-stripped T1 brain with known tissue labels, for the Slicer self-test.

Slicer's self-test must really run the bundled model but cannot ship or download patient data. This
phantom imitates what the demo model was trained on (a skull-stripped T1 at 1 mm): a folded
grey-matter ribbon around bright white matter, dark CSF in two ventricles and a thin outer layer,
zero outside the brain, mild noise. Labels follow the demo card: 0 background, 1 CSF, 2 grey
matter, 3 white matter.

Axis order: arrays are ``(z, y, x)`` with 1 mm voxels, like ``slicer.util.arrayFromVolume``.
"""

from __future__ import annotations

import numpy as np

from ..engine.metrics import dice  # noqa: F401  (the self-test scores against the phantom with phantom.dice)

# T1 intensities and tissue shares of the MNI152 template inside its brain mask: CSF about 45 % and
# grey matter about 78 % of the white-matter intensity; about 9 % CSF, 56 % grey, 35 % white matter.
# The shares matter: the model z-scores the non-zero voxels, so a phantom with too much white matter
# would look grey after normalisation.
INTENSITY = {1: 45.0, 2: 78.0, 3: 100.0}


def brain_phantom(shape_zyx: tuple[int, int, int] = (96, 112, 96), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(t1, labels)``: float32 T1-like image and uint8 labels of an ellipsoidal folded brain."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape_zyx
    z, y, x = np.meshgrid(
        np.arange(nz) - (nz - 1) / 2.0,
        np.arange(ny) - (ny - 1) / 2.0,
        np.arange(nx) - (nx - 1) / 2.0,
        indexing="ij",
    )
    radii = np.array([0.45 * nz, 0.45 * ny, 0.45 * nx])
    r = np.sqrt((z / radii[0]) ** 2 + (y / radii[1]) ** 2 + (x / radii[2]) ** 2)
    theta = np.arctan2(y, x)
    phi = np.arctan2(z, np.hypot(x, y))
    mean_radius = float(radii.mean())
    depth_mm = (1.0 - r) * mean_radius  # distance inside the brain surface, roughly in mm
    # Gyri: white matter reaches into the grey ribbon in folds a few millimetres deep.
    folds = np.sin(11 * theta) * np.cos(9 * phi) + 0.6 * np.sin(17 * phi + 7 * theta)

    labels = np.zeros(shape_zyx, np.uint8)
    brain = depth_mm > 0
    labels[brain] = 1  # outer CSF layer
    labels[depth_mm > 1.2] = 2  # grey-matter ribbon
    labels[depth_mm > 13.0 + 4.0 * folds] = 3  # folded white matter
    for side in (-1.0, 1.0):  # two lateral ventricles
        ventricle = ((z + 0.05 * nz) / (0.12 * nz)) ** 2 + ((y - 0.02 * ny) / (0.24 * ny)) ** 2 + (
            (x - side * 0.09 * nx) / (0.05 * nx)
        ) ** 2
        labels[(ventricle < 1.0) & brain] = 1

    t1 = np.zeros(shape_zyx, np.float32)
    for label, value in INTENSITY.items():
        t1[labels == label] = value
    t1 = _smooth(t1)  # partial-volume edges, as in a real scan
    t1[brain] += rng.normal(0.0, 4.0, size=int(brain.sum())).astype(np.float32)
    t1[~brain] = 0.0
    return np.clip(t1, 0.0, None).astype(np.float32), labels


def _smooth(array: np.ndarray) -> np.ndarray:
    """A 3-tap [1, 2, 1] / 4 blur along each axis (no SciPy needed inside Slicer)."""
    out = array.astype(np.float32)
    for axis in range(3):
        padded = np.pad(out, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
        lower = np.take(padded, range(0, out.shape[axis]), axis=axis)
        middle = np.take(padded, range(1, out.shape[axis] + 1), axis=axis)
        upper = np.take(padded, range(2, out.shape[axis] + 2), axis=axis)
        out = (lower + 2.0 * middle + upper) / 4.0
    return out


# The phantom has the template's tissue shares and contrasts. Checkpoints of the bundled model scored Dice
# 0.61-0.80 (CSF, mostly a thin partial-volume rim), 0.93-0.97 (grey), 0.94-0.97 (white matter) and
# 0.97-0.98 (whole brain) on it: the self-test's floors.
CLASS_DICE_MIN = 0.5
MEAN_DICE_MIN = 0.8
BRAIN_DICE_MIN = 0.9


def score(labels: np.ndarray, reference: np.ndarray) -> tuple[float, list[float]]:
    """Whole-brain Dice and the Dice of classes 1, 2, 3 (CSF, grey, white matter) against the phantom's labels."""
    brain = dice(labels > 0, reference > 0, True)
    return brain, [dice(labels, reference, label) for label in (1, 2, 3)]


def score_failures(brain: float, classes: list[float], names: list[str]) -> list[str]:
    """Which of the self-test's floors a result misses (empty: it passes)."""
    failures = [f"whole brain Dice {brain:.3f} < {BRAIN_DICE_MIN}"] if brain < BRAIN_DICE_MIN else []
    failures += [f"{name} Dice {value:.3f} < {CLASS_DICE_MIN}" for name, value in zip(names, classes)
                 if value < CLASS_DICE_MIN]
    if sum(classes) / len(classes) < MEAN_DICE_MIN:
        failures.append(f"mean class Dice {sum(classes) / len(classes):.3f} < {MEAN_DICE_MIN}")
    return failures
