"""preprocessing: reorientation, resampling, crop and normalisation per model card, and their exact
inverse for probabilities and labels (geometry round trip on an oblique, anisotropic image)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TINY_CARD, oblique_anisotropic_image
from UNet3DSegmentLib.base.errors import BadInputError, BadModelError
from UNet3DSegmentLib.engine.metrics import dice
from UNet3DSegmentLib.engine.preprocessing import nonzero_box, normalize, prepare, target_grid, Grid


def _card(spacing="native", orientation="native", method="none", params=None, crop=False, channels=("T1",)):
    """A stand-in with only the ``ModelCard`` attributes that ``prepare`` reads."""
    normalization = SimpleNamespace(method=method, params=dict(params or {}))
    return SimpleNamespace(input=SimpleNamespace(
        channels=tuple(channels), spacing=spacing, orientation=orientation,
        normalization=normalization, crop_to_nonzero=crop,
    ))


def _image(values: np.ndarray, like: sitk.Image | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(values)
    if like is not None:
        image.CopyInformation(like)
    return image


def _cap_image(radius: float = 12.0) -> tuple[sitk.Image, np.ndarray]:
    """The oblique anisotropic grid holding max(0, R^2 - r^2) around a point off its centre (mm):
    smooth, zero outside a sphere, so resampling keeps its iso-surfaces and the crop applies."""
    grid = oblique_anisotropic_image(shape_zyx=(20, 28, 32))
    size = np.array(grid.GetSize())
    off_centre = (size - 1) / 2.0 + np.array([2.0, -3.0, 3.0])  # asymmetric: flips would show
    centre = np.array(grid.TransformContinuousIndexToPhysicalPoint(off_centre.tolist()))
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(float)
    matrix = np.array(grid.GetDirection()).reshape(3, 3) @ np.diag(grid.GetSpacing())
    points = index @ matrix.T + np.array(grid.GetOrigin())
    values = np.maximum(0.0, radius**2 - ((points - centre) ** 2).sum(axis=-1)).astype(np.float32)
    return _image(values, like=grid), values


def _centroid_mm(image: sitk.Image, mask_zyx: np.ndarray) -> np.ndarray:
    index = np.argwhere(mask_zyx)[:, ::-1].mean(axis=0)
    return np.array(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (the one implementation, engine/metrics)."""
    return dice(np.asarray(a, dtype=bool), np.asarray(b, dtype=bool), True)


# ----------------------------------------------------------------------------------- identity path
def test_native_card_reads_without_resampling_and_restores_without_copy() -> None:
    image = oblique_anisotropic_image()
    prepared = prepare([image], _card(method="none"))
    assert prepared.is_identity and prepared.crop is None
    assert prepared.array.dtype == np.float32 and prepared.array.shape == (20, 24, 28, 1)
    np.testing.assert_array_equal(prepared.array[..., 0], sitk.GetArrayViewFromImage(image))
    probs = np.random.default_rng(0).random((20, 24, 28, 3)).astype(np.float32)
    assert prepared.restore_probabilities(probs) is probs
    labels = (probs.argmax(-1)).astype(np.uint8)
    restored = prepared.restore_labels(labels)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(restored), labels)
    assert restored.GetOrigin() == image.GetOrigin() and restored.GetDirection() == image.GetDirection()
    assert prepared.original_image is image


def test_real_model_card_is_accepted() -> None:
    from UNet3DSegmentLib.engine.card import card_from_dict

    card = card_from_dict(TINY_CARD)
    image = _image(np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4))
    prepared = prepare([image], card)
    values = np.arange(1, 24, dtype=np.float64)
    expected = np.concatenate([[0.0], (values - values.mean()) / values.std()])
    np.testing.assert_allclose(prepared.array.reshape(-1), expected, atol=1e-6)


# ---------------------------------------------------------------------------------- reorientation
def test_reorient_lps_to_ras_flips_x_and_y_exactly() -> None:
    values = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    image = _image(values)  # identity direction = LPS
    image.SetOrigin((10.0, 20.0, 30.0))
    prepared = prepare([image], _card(orientation="RAS"))
    np.testing.assert_array_equal(prepared.array[..., 0], values[:, ::-1, ::-1])
    assert prepared.working_grid.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert prepared.working_grid.origin == (14.0, 23.0, 30.0)  # the far corner in x and y
    restored = prepared.restore_labels((prepared.array[..., 0] % 7).astype(np.uint8))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(restored), values % 7)


def test_orientation_already_matching_is_not_touched() -> None:
    image = _image(np.ones((3, 4, 5), np.float32))
    prepared = prepare([image], _card(orientation="LPS"))
    assert prepared.is_identity


# ------------------------------------------------------------------------------------- resampling
def test_target_grid_size_is_rounded_extent_over_spacing() -> None:
    image = oblique_anisotropic_image()  # size (28, 24, 20), spacing (0.8, 1.1, 2.5)
    grid = target_grid(Grid.of(image), (1.0, 1.0, 1.0))
    assert grid.size == (22, 26, 50)  # 22.4, 26.4, 50.0 mm
    assert grid.origin == image.GetOrigin() and grid.direction == image.GetDirection()
    assert target_grid(Grid.of(image), (100.0, 100.0, 100.0)).size == (1, 1, 1)


def test_resampling_keeps_a_linear_ramp() -> None:
    x = np.arange(8, dtype=np.float32)
    values = np.broadcast_to(x, (4, 4, 8)).copy()  # value = x index, spacing 2 mm in x
    image = _image(values)
    image.SetSpacing((2.0, 1.0, 1.0))
    prepared = prepare([image], _card(spacing=(1.0, 1.0, 1.0)))
    assert prepared.working_grid.size == (16, 4, 4)
    expected = np.minimum(np.arange(16) / 2.0, 7.0)  # beyond the last voxel: nearest edge value
    np.testing.assert_allclose(prepared.array[0, 0, :, 0], expected, atol=1e-6)


# -------------------------------------------------------------------------------------------- crop
def test_crop_box_and_paste_back_at_exact_voxel_positions() -> None:
    values = np.zeros((10, 12, 14), dtype=np.float32)
    values[3:6, 0:4, 7:9] = 5.0  # touches the y = 0 border
    values[4, 2, 12] = 1.0
    image = _image(values)
    prepared = prepare([image], _card(crop=True))
    assert prepared.crop == (slice(2, 7), slice(0, 5), slice(6, 14))  # 1-voxel margin, clipped
    np.testing.assert_array_equal(prepared.array[..., 0], values[2:7, 0:5, 6:14])

    probs = np.zeros(prepared.array.shape[:3] + (2,), dtype=np.float32)
    probs[..., 1] = prepared.array[..., 0] > 0
    probs[..., 0] = 1.0 - probs[..., 1]
    full = prepared.restore_probabilities(probs)
    assert full.shape == (10, 12, 14, 2)
    np.testing.assert_array_equal(full[..., 1], values > 0)
    outside = np.ones(values.shape, dtype=bool)
    outside[2:7, 0:5, 6:14] = False
    assert np.all(full[outside, 0] == 1.0) and np.all(full[outside, 1] == 0.0)

    labels = prepared.restore_labels(probs[..., 1].astype(np.uint8) * 2)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels), (values > 0) * 2)


def test_crop_uses_the_union_of_channels_and_skips_empty_images() -> None:
    first = np.zeros((6, 6, 6), np.float32)
    second = np.zeros((6, 6, 6), np.float32)
    first[2, 2, 2] = 1.0
    second[3, 3, 4] = 1.0
    assert nonzero_box([first, second], margin=1) == (slice(1, 5), slice(1, 5), slice(1, 6))
    assert nonzero_box([np.zeros((4, 4, 4))], margin=1) is None  # all zero: keep everything
    assert nonzero_box([np.ones((4, 4, 4))], margin=1) is None  # box is the whole image
    prepared = prepare([_image(np.zeros((4, 4, 4), np.float32))], _card(crop=True))
    assert prepared.crop is None and prepared.array.shape == (4, 4, 4, 1)


# -------------------------------------------------------------------------------- geometry round trip
def test_oblique_anisotropic_round_trip_restores_the_input_grid() -> None:
    image, values = _cap_image()
    card = _card(spacing=(1.0, 1.0, 1.0), orientation="RAS", crop=True)
    prepared = prepare([image], card)
    assert not prepared.is_identity and prepared.crop is not None
    assert prepared.working_grid.spacing == (1.0, 1.0, 1.0)
    threshold = 12.0**2 - 10.0**2  # the sphere of radius 10 mm
    predicted = (prepared.array[..., 0] > threshold).astype(np.uint8)  # "identity" network
    expected = values > threshold

    labels = prepared.restore_labels(predicted)
    assert labels.GetSize() == image.GetSize()
    np.testing.assert_allclose(labels.GetSpacing(), image.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(labels.GetOrigin(), image.GetOrigin(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(labels.GetDirection(), image.GetDirection(), rtol=0, atol=1e-6)
    restored_labels = sitk.GetArrayViewFromImage(labels) == 1
    assert _dice(restored_labels, expected) > 0.95
    # A half-voxel shift (0.5 mm on the 1 mm grid) would move the centroid; rounding moves it < 0.3 mm.
    assert np.linalg.norm(_centroid_mm(image, restored_labels) - _centroid_mm(image, expected)) < 0.3

    probs = np.stack([1 - predicted, predicted], axis=-1).astype(np.float32)
    restored = prepared.restore_probabilities(probs)
    assert restored.shape == values.shape + (2,) and restored.dtype == np.float32
    np.testing.assert_allclose(restored.sum(axis=-1), 1.0, atol=1e-5)
    assert _dice(restored.argmax(axis=-1) == 1, expected) > 0.96  # linear: better than labels


def test_restore_refuses_outputs_of_another_shape() -> None:
    prepared = prepare([_image(np.ones((4, 5, 6), np.float32))], _card())
    with pytest.raises(BadInputError, match=r"shape \(4, 5, 7, 2\) but the prepared input is \(4, 5, 6\)"):
        prepared.restore_probabilities(np.zeros((4, 5, 7, 2), np.float32))
    with pytest.raises(BadInputError, match="labels must be integers"):
        prepared.restore_labels(np.zeros((4, 5, 6), np.float32))


# ---------------------------------------------------------------------------------- normalisation
def test_zscore_nonzero_uses_nonzero_voxels_and_keeps_zeros() -> None:
    values = np.array([[[0, 1, 2, 3]]], dtype=np.int16)
    std = np.sqrt(2.0 / 3.0)
    np.testing.assert_allclose(normalize(values, "zscore-nonzero"), [[[0.0, -1 / std, 0.0, 1 / std]]], atol=1e-6)
    np.testing.assert_array_equal(normalize(np.full((2, 2, 2), 5.0), "zscore-nonzero"), np.zeros((2, 2, 2)))
    np.testing.assert_array_equal(normalize(np.zeros((2, 2, 2)), "zscore-nonzero"), np.zeros((2, 2, 2)))


def test_percentile_zscore_clips_then_standardises() -> None:
    values = np.arange(101, dtype=np.float32).reshape(1, 1, 101)  # percentile p is value p
    result = normalize(values, "percentile-zscore", {"lower": 10.0, "upper": 90.0})
    clipped = np.clip(np.arange(101.0), 10.0, 90.0)
    np.testing.assert_allclose(result.reshape(-1), (clipped - clipped.mean()) / clipped.std(), atol=1e-5)
    constant = normalize(np.full((3, 3, 3), 7.0), "percentile-zscore")  # defaults 0.5 / 99.5
    np.testing.assert_array_equal(constant, np.zeros((3, 3, 3)))


def test_window_clips_and_scales_to_unit_range() -> None:
    values = np.array([[[-100, 0, 50, 200]]], dtype=np.int16)
    result = normalize(values, "window", {"min": -50, "max": 150})
    np.testing.assert_allclose(result, [[[0.0, 0.25, 0.5, 1.0]]], atol=1e-7)
    with pytest.raises(BadModelError, match="needs 'min' and 'max'"):
        normalize(values, "window", {"min": 0})
    with pytest.raises(BadModelError, match="max > min"):
        normalize(values, "window", {"min": 5, "max": 5})


def test_none_casts_and_unknown_methods_are_refused() -> None:
    values = np.array([[[-3, 0, 7]]], dtype=np.int16)
    result = normalize(values, "none")
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, [[[-3.0, 0.0, 7.0]]])
    with pytest.raises(BadModelError, match="unknown normalisation method 'minmax'"):
        normalize(values, "minmax")


def test_channels_are_normalised_separately_and_stacked_in_order() -> None:
    first = np.array([[[1.0, 3.0]]], dtype=np.float32)
    second = np.array([[[10.0, 30.0]]], dtype=np.float32)
    card = _card(method="zscore-nonzero", channels=("T1", "T2"))
    prepared = prepare([_image(first), _image(second)], card)
    assert prepared.array.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(prepared.array[0, 0], [[-1.0, -1.0], [1.0, 1.0]], atol=1e-6)


# ------------------------------------------------------------------------------------- validation
def test_card_and_channel_count_problems_are_reported() -> None:
    image = _image(np.ones((2, 2, 2), np.float32))
    with pytest.raises(BadInputError, match=r"expects 2 channel\(s\) \(T1, T2\) but 1 volume"):
        prepare([image], _card(channels=("T1", "T2")))
    with pytest.raises(BadModelError, match="orientation 'RAR'"):
        prepare([image], _card(orientation="RAR"))
    with pytest.raises(BadModelError, match="spacing"):
        prepare([image], _card(spacing=(1.0, 0.0, 1.0)))


# --------------------------------------------------------------------------------------------------
# The card's ``input.background``: a background that is not exactly zero is cleared before the crop
def _background_card(below=0.1, piece=1.0, crop=True):
    card = _card(method="zscore-nonzero", crop=crop)
    card.input.background = SimpleNamespace(below=below, min_piece_ml=piece)
    return card


def _phantom_with_noise(level: float = 0.03, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    from UNet3DSegmentLib.client.phantom import brain_phantom

    t1, labels = brain_phantom((64, 72, 64))
    rng = np.random.default_rng(seed)
    noisy = t1.copy()
    outside = labels == 0
    noisy[outside] = np.abs(rng.normal(0.0, level * float(t1.max()), int(outside.sum())))
    return t1, noisy


def test_background_noise_is_cleared_so_the_model_sees_the_clean_image() -> None:
    from UNet3DSegmentLib.engine.preprocessing import clear_background

    clean, noisy = _phantom_with_noise()
    card = _background_card()
    prepared_clean = prepare([_image(clean)], card)
    prepared_noisy = prepare([_image(noisy)], card)
    # Without the section the noisy image is neither cropped nor normalised like the clean one.
    plain = prepare([_image(noisy)], _card(method="zscore-nonzero", crop=True))
    assert plain.array.shape[:3] == noisy.shape
    # The crop is the brain's box (a noise voxel touching the brain may widen it by one voxel).
    for noisy_side, clean_side in zip(prepared_noisy.crop, prepared_clean.crop):
        assert abs(noisy_side.start - clean_side.start) <= 1 and abs(noisy_side.stop - clean_side.stop) <= 1

    def full(prepared):
        values = np.zeros(noisy.shape, np.float32)
        values[prepared.crop] = prepared.array[..., 0]
        return values

    brain = clean > 0
    assert np.abs(full(prepared_noisy)[brain] - full(prepared_clean)[brain]).max() < 0.05
    kept_noise = np.count_nonzero(full(prepared_noisy)[~brain])
    assert kept_noise < 0.001 * np.count_nonzero(~brain), kept_noise  # (almost) every noise voxel cleared
    # The brain itself is untouched: every non-zero voxel of the clean phantom is above the level.
    cleared = clear_background([clean], 0.1, 1.0, (1.0, 1.0, 1.0))[0]
    np.testing.assert_array_equal(cleared, clean)


def test_small_bright_pieces_outside_the_object_are_background() -> None:
    from UNet3DSegmentLib.engine.preprocessing import clear_background

    array = np.zeros((30, 30, 30), np.float32)
    array[5:20, 5:20, 5:20] = 100.0  # 3.4 mL at 1 mm: kept
    array[25, 25, 25] = 90.0  # one bright noise voxel: a piece of 0.001 mL
    array[26:28, 2:4, 2:4] = 80.0  # 8 voxels: 0.008 mL
    cleared = clear_background([array], 0.1, 0.5, (1.0, 1.0, 1.0))[0]
    assert cleared[25, 25, 25] == 0 and not cleared[26:28, 2:4, 2:4].any()
    assert np.count_nonzero(cleared) == 15 ** 3
    # min_piece_ml 0 keeps every piece; with 2 mm voxels 8 voxels are 0.064 mL, still below 0.5 mL.
    assert np.count_nonzero(clear_background([array], 0.1, 0.0, (1.0, 1.0, 1.0))[0]) == 15 ** 3 + 9
    assert np.count_nonzero(clear_background([array], 0.1, 0.5, (2.0, 2.0, 2.0))[0]) == 15 ** 3


def test_background_is_where_every_channel_is_low() -> None:
    from UNet3DSegmentLib.engine.preprocessing import clear_background

    first = np.zeros((20, 20, 20), np.float32)
    second = np.zeros((20, 20, 20), np.float32)
    first[2:12, 2:12, 2:12] = 50.0
    second[8:18, 8:18, 8:18] = 70.0
    noise = np.random.default_rng(0).uniform(0, 2.0, first.shape).astype(np.float32)
    cleared = clear_background([first + noise, second + noise], 0.1, 0.0, (1.0, 1.0, 1.0))
    union = (first > 0) | (second > 0)
    assert ((cleared[0] != 0) == union).all() and ((cleared[1] != 0) == union).all()
    np.testing.assert_array_equal(cleared[0][union], (first + noise)[union])


def test_dark_cavities_inside_the_object_are_not_background() -> None:
    """A ventricle darker than the background level, enclosed by tissue, keeps its values."""
    from UNet3DSegmentLib.engine.preprocessing import clear_background

    array = np.zeros((30, 30, 30), np.float32)
    array[5:25, 5:25, 5:25] = 100.0
    array[12:18, 12:18, 12:18] = 4.0  # below 10 % of the 99th percentile, but inside
    noise = np.random.default_rng(1).uniform(0.5, 3.0, array.shape).astype(np.float32)
    noisy = np.where(array > 0, array, noise)
    cleared = clear_background([noisy], 0.1, 1.0, (1.0, 1.0, 1.0))[0]
    assert (cleared[12:18, 12:18, 12:18] == 4.0).all()
    assert np.count_nonzero(cleared) == 20 ** 3 and not cleared[:5].any()
    untouched = clear_background([array], 0.1, 1.0, (1.0, 1.0, 1.0))[0]
    assert untouched is array  # nothing to clear: no copy
