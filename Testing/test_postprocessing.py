"""Argmax labelmaps, largest-component clean-up and Dice (engine/metrics) on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from UNet3DSegmentLib.engine import metrics, postprocessing
from UNet3DSegmentLib.base.errors import BadInputError
from UNet3DSegmentLib.engine.postprocessing import (
    dice,
    dice_per_class,
    keep_largest_component,
    label_dtype,
    labels_from_probabilities,
)


# --------------------------------------------------------------------------------------------------
# Argmax
# --------------------------------------------------------------------------------------------------
def test_argmax_values_and_ties():
    probs = np.array(
        [[[[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.2, 0.4, 0.4]],
          [[1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0], [0.3, 0.3, 0.4]]]],
        dtype=np.float32,
    )  # (z, y, x, k) = (1, 2, 3, 3)
    labels = labels_from_probabilities(probs)
    # ties go to the lowest label: (0.5, 0.5, 0) -> 0, (0.2, 0.4, 0.4) -> 1, all equal -> 0
    np.testing.assert_array_equal(labels, np.array([[[1, 0, 1], [0, 2, 2]]], dtype=np.uint8))
    assert labels.dtype == np.uint8


@pytest.mark.parametrize(
    "classes, dtype", [(2, np.uint8), (4, np.uint8), (256, np.uint8), (257, np.uint16),
                       (65536, np.uint16)]
)
def test_label_dtype(classes, dtype):
    assert label_dtype(classes) == dtype


def test_many_classes_give_uint16():
    probs = np.zeros((2, 1, 1, 300), np.float32)
    probs[0, 0, 0, 299] = 1.0
    probs[1, 0, 0, 7] = 1.0
    labels = labels_from_probabilities(probs)
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels[:, 0, 0], [299, 7])


def test_argmax_in_slabs_matches_numpy(monkeypatch):
    monkeypatch.setattr(postprocessing, "_ARGMAX_SLAB_VOXELS", 50)  # slabs of 2 z-slices
    probs = np.random.default_rng(3).random((9, 5, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(labels_from_probabilities(probs), np.argmax(probs, axis=-1))


def test_argmax_rejects_a_scalar_per_voxel():
    with pytest.raises(BadInputError, match=r"probabilities must be \(\.\.\., classes\)"):
        labels_from_probabilities(np.zeros(5, np.float32))


# --------------------------------------------------------------------------------------------------
# Largest connected component
# --------------------------------------------------------------------------------------------------
def blobs() -> np.ndarray:
    """Class 1: a 3x3x3 cube and a separate 2-voxel piece; class 2: a 2x2x2 cube and 1 voxel."""
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[1:4, 1:4, 1:4] = 1  # 27 voxels
    labels[8, 8, 7:9] = 1  # 2 voxels, far away
    labels[6:8, 1:3, 1:3] = 2  # 8 voxels
    labels[1, 8, 1] = 2  # 1 voxel
    labels[5, 5, 5] = 3  # a lone class: its only piece stays
    return labels


def test_keeps_the_largest_piece_of_every_class():
    labels = blobs()
    cleaned = keep_largest_component(labels)
    expected = labels.copy()
    expected[8, 8, 7:9] = 0
    expected[1, 8, 1] = 0
    np.testing.assert_array_equal(cleaned, expected)
    assert cleaned.dtype == labels.dtype
    np.testing.assert_array_equal(labels, blobs())  # the input is left alone


def test_only_the_requested_classes_are_cleaned():
    cleaned = keep_largest_component(blobs(), classes=[2])
    expected = blobs()
    expected[1, 8, 1] = 0
    np.testing.assert_array_equal(cleaned, expected)  # class 1's small piece stays


def test_background_is_never_trimmed():
    labels = blobs()
    np.testing.assert_array_equal(keep_largest_component(labels, classes=[0]), labels)


def test_diagonal_neighbours_are_connected_by_default():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[0:2, 0:2, 0:2] = 1  # 8 voxels
    labels[2, 2, 2] = 1  # touches the cube only at a corner
    labels[4:6, 4:6, 4:6] = 1  # 8 voxels, two voxels away from (2, 2, 2): a separate piece
    labels[5, 0, 5] = 1
    kept = keep_largest_component(labels)  # 26-connectivity: cube + corner voxel = 9 is largest
    expected = np.zeros_like(labels)
    expected[0:2, 0:2, 0:2] = 1
    expected[2, 2, 2] = 1
    np.testing.assert_array_equal(kept, expected)
    face_only = keep_largest_component(labels, fully_connected=False)  # 6-connectivity: 8 vs 8
    assert np.count_nonzero(face_only) == 8
    assert face_only[2, 2, 2] == 0 and face_only[5, 0, 5] == 0


def test_two_dimensional_labelmap():
    labels = np.array([[1, 1, 0, 1], [1, 0, 0, 0], [0, 0, 2, 2]], np.uint16)
    np.testing.assert_array_equal(
        keep_largest_component(labels), [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 2, 2]]
    )


def test_keep_largest_rejects_probabilities():
    with pytest.raises(BadInputError, match="2-D or 3-D integer labelmap, got 3-D float32"):
        keep_largest_component(np.zeros((3, 3, 3), np.float32))


# --------------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------------
def test_dice_values():
    a = np.array([[1, 1, 1, 0], [2, 2, 0, 0]])
    b = np.array([[1, 1, 0, 0], [2, 0, 0, 3]])
    assert dice(a, b, 1) == pytest.approx(2 * 2 / (3 + 2))  # 0.8
    assert dice(a, b, 2) == pytest.approx(2 * 1 / (2 + 1))
    assert dice(a, b, 3) == 0.0  # only in b
    assert dice(a, b, 0) == pytest.approx(2 * 2 / (3 + 4))
    assert dice(a, b, 9) == 1.0  # in neither: empty vs empty
    assert dice(a, a, 2) == 1.0


def test_dice_per_class():
    a = np.array([[1, 1, 1, 0], [2, 2, 0, 0]])
    b = np.array([[1, 1, 0, 0], [2, 0, 0, 3]])
    scores = dice_per_class(a, b, [1, 2, 3, 4])
    assert scores == pytest.approx({1: 0.8, 2: 2 / 3, 3: 0.0, 4: 1.0})
    assert all(isinstance(key, int) for key in scores)


def test_dice_shape_mismatch():
    with pytest.raises(BadInputError, match=r"same shape to compare, got \(2, 2\) and \(2, 3\)"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)), 1)


def test_dice_of_boolean_masks():
    a = np.array([[True, True, False], [False, True, False]])
    b = np.array([[True, False, False], [False, True, True]])
    assert metrics.dice(a, b, True) == pytest.approx(2 * 2 / (3 + 3))
    assert metrics.dice(a, b, False) == pytest.approx(2 * 2 / (3 + 3))


def test_counts_and_dice_from_counts_agree_with_dice():
    """Counts added over batches give the Dice of the whole: how training scores its validation set."""
    rng = np.random.default_rng(0)
    pred, ref = rng.integers(0, 4, size=(2, 5, 6, 7)), rng.integers(0, 4, size=(2, 5, 6, 7))
    ref[ref == 3] = 0  # label 3 only in the prediction; label 5 in neither
    counts = metrics.class_counts(pred[0], ref[0], 6) + metrics.class_counts(pred[1], ref[1], 6)
    np.testing.assert_array_equal(counts, metrics.label_counts(pred, ref, range(6)))
    whole = metrics.dice_from_counts(*counts)
    assert whole.tolist() == pytest.approx([metrics.dice(pred, ref, k) for k in range(6)])
    assert whole[3] == 0.0 and whole[5] == 1.0
    with pytest.raises(BadInputError, match="same shape to compare"):
        metrics.class_counts(pred[0], ref, 4)


def test_dice_has_one_implementation():
    """postprocessing, the Slicer self-test phantom and training all use engine/metrics."""
    from UNet3DSegmentLib.client import phantom
    from UNet3DSegmentLib.training import loop

    assert postprocessing.dice is metrics.dice and postprocessing.dice_per_class is metrics.dice_per_class
    assert phantom.dice is metrics.dice
    assert loop.class_counts is metrics.class_counts and loop.dice_from_counts is metrics.dice_from_counts
