"""Dice overlap between labelmaps: the one implementation that evaluation, training and the self-test use.

Dice of a label is ``2 |A & B| / (|A| + |B|)`` over the voxels carrying it in a prediction ``A`` and a
reference ``B``, and 1.0 when both lack it (two empty masks agree). Everything is computed from three
voxel counts per label, so a training loop can add counts over many batches and take Dice once.

Only numpy is needed, so this module is cheap to import (Slicer's self-test uses it through
``client/phantom.py``).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ..base.errors import BadInputError


def label_counts(predicted: Any, reference: Any, labels: Iterable[Any]) -> np.ndarray:
    """``(3, len(labels))`` int64 counts: intersection, predicted and reference voxels of each label.

    ``predicted`` and ``reference`` are labelmaps of the same shape (any dimension); a label may be
    any value they are compared with, ``True`` included for boolean masks.
    """
    first, second = np.asarray(predicted), np.asarray(reference)
    if first.shape != second.shape:
        raise BadInputError(
            f"labelmaps must have the same shape to compare, got {first.shape} and {second.shape}"
        )
    labels = list(labels)
    counts = np.zeros((3, len(labels)), dtype=np.int64)
    for column, label in enumerate(labels):
        in_first, in_second = first == label, second == label
        counts[:, column] = (
            np.count_nonzero(in_first & in_second), np.count_nonzero(in_first), np.count_nonzero(in_second)
        )
    return counts


def class_counts(predicted: Any, reference: Any, num_classes: int) -> np.ndarray:
    """``(3, num_classes)`` counts (intersection, predicted, reference) of labels ``0 .. num_classes - 1``."""
    return label_counts(predicted, reference, range(num_classes))


def dice_from_counts(intersection: Any, predicted: Any, reference: Any) -> np.ndarray:
    """Per-label Dice ``2 I / (P + R)`` from voxel counts; 1.0 where a label is absent from both."""
    intersection, predicted, reference = (np.asarray(v) for v in (intersection, predicted, reference))
    total = predicted + reference
    return np.where(total > 0, 2.0 * intersection / np.maximum(total, 1), 1.0)


def dice_per_class(pred: Any, ref: Any, labels: Iterable[int]) -> dict[int, float]:
    """Dice of every label in ``labels`` between a prediction and a reference labelmap, keyed by int label."""
    labels = [int(label) for label in labels]
    scores = dice_from_counts(*label_counts(pred, ref, labels))
    return {label: float(score) for label, score in zip(labels, scores)}


def dice(a: Any, b: Any, label: Any) -> float:
    """Dice of ``label`` in two labelmaps of the same shape; 1.0 if both lack it."""
    return float(dice_from_counts(*label_counts(a, b, [label]))[0])
