"""Sliding-window inference with stand-in predictors: tiling, weights, blending, TTA, cancel,
errors.

Every predictor here is plain numpy, so the expected outputs are known exactly.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from UNet3DSegmentLib.base.errors import BadInputError, CancelledError
from UNet3DSegmentLib.engine.blending import gaussian_weights, importance_map
from UNet3DSegmentLib.engine.tiling import count_patches, grid_starts, tile_starts
from UNet3DSegmentLib.engine.window import WindowConfig, sliding_window_predict


def coordinate_image(shape_zyx, channels: int = 1) -> np.ndarray:
    """(z, y, x, c) float32 image whose value encodes the voxel position, distinct everywhere."""
    z, y, x = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape_zyx), indexing="ij")
    base = z * 1000.0 + y * 30.0 + x
    return np.stack([base + 7.0 * c for c in range(channels)], axis=-1).astype(np.float32)


def identity_like(batch: np.ndarray) -> np.ndarray:
    """x -> concat(x, 2x): a per-voxel function of the input, so blending must give it back."""
    return np.concatenate([batch, 2.0 * batch], axis=-1)


class Recorder:
    """Predictor wrapper that counts calls and patches and keeps copies of the inputs."""

    def __init__(self, function=identity_like) -> None:
        self.function = function
        self.calls = 0
        self.patches = 0
        self.inputs: list[np.ndarray] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.patches += batch.shape[0]
        self.inputs.append(batch.copy())
        return self.function(batch)


# --------------------------------------------------------------------------------------------------
# Tile starts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, patch, overlap, expected",
    [
        (10, 16, 0.5, [0]),  # smaller than the patch
        (16, 16, 0.5, [0]),  # exactly the patch
        (16, 16, 0.0, [0]),
        (17, 16, 0.0, [0, 1]),  # one voxel more: a second, flush tile
        (32, 16, 0.0, [0, 16]),  # tiles side by side, no overlap
        (33, 16, 0.0, [0, 9, 17]),  # 8.5 rounds half up  # 17 > 16: three tiles, spread evenly
        (32, 16, 0.5, [0, 8, 16]),
        (40, 16, 0.5, [0, 8, 16, 24]),
        (41, 16, 0.5, [0, 6, 13, 19, 25]),  # span 25 > 3 * 8: four intervals of 6-7
        (32, 16, 0.75, [0, 4, 8, 12, 16]),
        (100, 64, 0.0, [0, 36]),
        (100, 64, 0.5, [0, 18, 36]),
        (100, 64, 0.75, [0, 12, 24, 36]),
        (128, 64, 0.5, [0, 32, 64]),
        (20, 10, 0.9, list(range(11))),  # 10 * 0.1 must count as a step of 1, not 0
        (5, 4, 0.99, [0, 1]),  # step rounds below 1: still 1
    ],
)
def test_tile_starts_table(size, patch, overlap, expected):
    assert tile_starts(size, patch, overlap) == expected


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("size, patch", [(17, 16), (50, 16), (97, 32), (240, 64), (155, 64)])
def test_tile_starts_properties(size, patch, overlap):
    starts = tile_starts(size, patch, overlap)
    steps = np.diff(starts)
    allowed = max(1, int(np.floor(patch * (1 - overlap) + 1e-9)))
    assert starts[0] == 0 and starts[-1] == size - patch
    assert steps.max() <= allowed  # every pair of neighbours overlaps at least `overlap`
    assert steps.max() - steps.min() <= 1  # evenly spaced
    # as few tiles as the step allows: one tile fewer could not cover the span
    assert (len(starts) - 2) * allowed < size - patch


def test_grid_and_count_match_the_design_notes():
    # 240 x 240 x 155 volume (z, y, x = 155, 240, 240), 64^3 patches: 48 at overlap 0, 196 at 0.5
    assert count_patches((155, 240, 240), (64, 64, 64), 0.0) == 48
    assert count_patches((155, 240, 240), (64, 64, 64), 0.5) == 196
    grid = grid_starts((155, 240, 240), (64, 64, 64), 0.0)
    assert len(grid) == 48
    assert grid[:5] == [(0, 0, 0), (0, 0, 59), (0, 0, 117), (0, 0, 176), (0, 59, 0)]
    assert grid[-1] == (91, 176, 176)


def test_grid_starts_order_and_anisotropic_patch():
    assert grid_starts((20, 16, 8), (16, 8, 8), 0.5) == [
        (z, y, 0) for z in (0, 4) for y in (0, 4, 8)
    ]
    assert count_patches((20, 16, 8), (16, 8, 8), 0.5) == 6


# --------------------------------------------------------------------------------------------------
# Importance map
# --------------------------------------------------------------------------------------------------
def test_constant_map_is_ones():
    weights = importance_map((4, 6, 8), "constant")
    assert weights.dtype == np.float32 and weights.shape == (4, 6, 8)
    np.testing.assert_array_equal(weights, np.ones((4, 6, 8), np.float32))


@pytest.mark.parametrize("patch", [(16, 16, 16), (17, 17, 17), (8, 16, 32)])
def test_gaussian_map_properties(patch):
    weights = importance_map(patch, "gaussian")
    assert weights.dtype == np.float32 and weights.shape == patch
    assert weights.max() == 1.0
    centre = tuple(p // 2 for p in patch)
    assert weights[centre] == 1.0  # the centre voxel (one of the two middle ones if even)
    assert weights.min() > 0.0
    assert np.unravel_index(np.argmin(weights), patch) == (0, 0, 0)  # corners weigh least
    for axis in range(3):  # mirror-symmetric along every axis
        np.testing.assert_array_equal(weights, np.flip(weights, axis))
    for axis, side in enumerate(patch):  # sigma = side / 8 from the profile through the centre
        index = list(centre)
        index[axis] = slice(None)
        profile = weights[tuple(index)].astype(np.float64)
        offset = np.arange(side) - (side - 1) / 2.0
        far, near = 0, side // 2  # log ratio of two points on a Gaussian gives sigma exactly
        sigma = np.sqrt(
            (offset[far] ** 2 - offset[near] ** 2) / (2.0 * np.log(profile[near] / profile[far]))
        )
        assert sigma == pytest.approx(side / 8.0, rel=1e-5)


def test_gaussian_is_clamped_above_zero():
    # sigma = 64 / 200 voxel: exp(-0.5 * (31.5 / 0.32)^2) underflows to 0 away from the centre.
    weights = gaussian_weights((1, 1, 64), 1.0 / 200.0)
    assert weights.max() == 1.0
    assert weights.min() > 0.0
    smallest = weights[0, 0, 27]  # the farthest voxel that does not underflow (a float32 denormal)
    assert 0.0 < smallest < 1e-37
    assert weights[0, 0, 28] > smallest
    np.testing.assert_array_equal(weights[0, 0, :28], smallest)  # underflowed voxels got it
    np.testing.assert_array_equal(weights[0, 0, 36:], smallest)


def test_importance_map_is_cached_and_read_only():
    first = importance_map((16, 16, 16), "gaussian")
    assert importance_map([16, 16, 16], "gaussian") is first
    assert not first.flags.writeable
    with pytest.raises(ValueError):
        first[0, 0, 0] = 2.0


# --------------------------------------------------------------------------------------------------
# Blending with stand-in predictors
# --------------------------------------------------------------------------------------------------
SHAPES = [(16, 16, 16), (20, 24, 28), (8, 40, 12), (5, 9, 3), (33, 17, 16)]
OVERLAPS = [0.0, 0.5, 0.75]
BLENDS = ["constant", "gaussian"]


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_identity_like_predictor_gives_back_the_image(shape, overlap, blend):
    image = coordinate_image(shape, channels=2)
    predictor = Recorder()
    output = sliding_window_predict(
        image, predictor, patch_size=(16, 16, 16), overlap=overlap, blend=blend, batch_size=3
    )
    assert output.dtype == np.float32 and output.shape == shape + (4,)
    expected = np.concatenate([image, 2.0 * image], axis=-1)
    if blend == "constant":  # integer values averaged over equal weights: exact in float32
        np.testing.assert_array_equal(output, expected)
    else:
        np.testing.assert_allclose(output, expected, rtol=2e-6, atol=0)
    padded_shape = tuple(max(s, 16) for s in shape)
    assert predictor.patches == count_patches(padded_shape, (16, 16, 16), overlap)
    assert predictor.calls == -(-predictor.patches // 3)


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("overlap", OVERLAPS)
def test_constant_predictor_gives_constants(overlap, blend):
    probabilities = np.array([0.125, 0.25, 0.625], dtype=np.float32)

    def constant(batch: np.ndarray) -> np.ndarray:
        return np.broadcast_to(probabilities, batch.shape[:4] + (3,))

    output = sliding_window_predict(
        np.zeros((21, 18, 30, 1), np.float32), constant, patch_size=(8, 8, 16), overlap=overlap, blend=blend,
        batch_size=4, skip_empty=False,  # an all-zero image: every tile would be skipped otherwise
    )
    np.testing.assert_allclose(output, np.broadcast_to(probabilities, (21, 18, 30, 3)), rtol=1e-6)


def reference_blend(image, predict, patch, overlap, blend):
    """Plain float64 re-implementation: every tile alone, weighted sum, divided by the weights."""
    weights = importance_map(patch, blend).astype(np.float64)
    total = None
    weight_sum = np.zeros(image.shape[:3])
    for z, y, x in grid_starts(image.shape[:3], patch, overlap):
        region = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
        out = predict(image[region][np.newaxis])[0].astype(np.float64)
        if total is None:
            total = np.zeros(image.shape[:3] + (out.shape[-1],))
        total[region] += out * weights[..., np.newaxis]
        weight_sum[region] += weights
    return total / weight_sum[..., np.newaxis]


def position_dependent(batch: np.ndarray) -> np.ndarray:
    """Output depends on where a voxel sits inside its patch: tiles disagree, weights matter."""
    pz, py, px = batch.shape[1:4]
    z, y, x = np.meshgrid(np.arange(pz), np.arange(py), np.arange(px), indexing="ij")
    inside = (z + 2 * y + 3 * x).astype(np.float32)
    half = np.broadcast_to(inside * 0.5, batch.shape[:4])
    return np.stack([batch[..., 0] + inside, half], axis=-1)


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("shape", [(20, 24, 28), (16, 33, 17)])
def test_weighted_average_matches_reference(shape, overlap, blend):
    image = coordinate_image(shape)
    output = sliding_window_predict(image, position_dependent, WindowConfig((16, 16, 16), overlap, blend, 2))
    expected = reference_blend(image, position_dependent, (16, 16, 16), overlap, blend)
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-4)
    if overlap > 0 and blend == "gaussian":  # the blend really mixes tiles at overlaps
        plain = reference_blend(image, position_dependent, (16, 16, 16), overlap, "constant")
        assert np.abs(expected - plain).max() > 0.1


def test_small_image_is_zero_padded_centred_and_cropped_back():
    image = coordinate_image((4, 10, 16)) + 1.0
    predictor = Recorder(lambda batch: batch.copy())
    output = sliding_window_predict(image, predictor, WindowConfig((8, 16, 16), 0.5, "gaussian", 1))
    np.testing.assert_allclose(output, image, rtol=1e-6)
    assert predictor.calls == 1
    seen = predictor.inputs[0][0, ..., 0]
    expected = np.zeros((8, 16, 16), np.float32)
    expected[2:6, 3:13, :] = image[..., 0]  # constant 0 around, image in the middle
    np.testing.assert_array_equal(seen, expected)


def test_predictor_sees_the_right_patches_and_gets_float32():
    image = coordinate_image((28, 16, 16)).astype(np.float64)
    predictor = Recorder(lambda batch: batch)
    sliding_window_predict(image, predictor, patch_size=(16, 16, 16), overlap=0.5, blend="constant", batch_size=2)
    assert [batch.shape[0] for batch in predictor.inputs] == [2, 1]  # starts z = 0, 6, 12
    assert all(batch.dtype == np.float32 for batch in predictor.inputs)
    for batch, z in zip([predictor.inputs[0][0], predictor.inputs[0][1], predictor.inputs[1][0]],
                        [0, 6, 12]):
        np.testing.assert_array_equal(batch, image[z:z + 16].astype(np.float32))


# --------------------------------------------------------------------------------------------------
# Progress and cancel
# --------------------------------------------------------------------------------------------------
def test_progress_sequence():
    calls = []
    sliding_window_predict(
        coordinate_image((16, 16, 40)), identity_like, WindowConfig((16, 16, 16), 0.5, "gaussian", 2),
        progress=lambda done, total: calls.append((done, total)),
    )
    # x starts 0, 8, 16, 24: four patches in two batches
    assert calls == [(2, 4), (4, 4)]


def test_progress_counts_every_tta_pass():
    calls = []
    sliding_window_predict(
        coordinate_image((16, 16, 40)), identity_like, WindowConfig((16, 16, 16), 0.5, "gaussian", 3),
        progress=lambda done, total: calls.append((done, total)), mirror_axes=(1, 2),
    )
    # batches of 3 and 1 patches, four flip passes each: 16 patches in all
    assert calls == [(3, 16), (6, 16), (9, 16), (12, 16), (13, 16), (14, 16), (15, 16), (16, 16)]


def test_cancel_set_before_start_calls_nothing():
    cancel = threading.Event()
    cancel.set()
    predictor = Recorder()
    with pytest.raises(CancelledError, match=r"^cancelled after 0 of 4 patches"):
        sliding_window_predict(coordinate_image((16, 16, 40)), predictor, patch_size=(16, 16, 16), overlap=0.5,
                               cancel=cancel, batch_size=1)
    assert predictor.calls == 0


@pytest.mark.parametrize("prefetch", [False, True])
def test_cancel_during_run_stops_before_the_next_batch(prefetch: bool):
    """In turn: no call after the cancel. Pipelined: at most the one batch already in the model thread."""
    cancel = threading.Event()
    predictor = Recorder()

    def progress(done: int, total: int) -> None:
        if done == 2:
            cancel.set()

    with pytest.raises(CancelledError, match=r"^cancelled after 2 of 8 patches$"):
        sliding_window_predict(coordinate_image((16, 24, 40)), predictor, patch_size=(16, 16, 16), overlap=0.5,
                               batch_size=1, progress=progress, cancel=cancel, prefetch=prefetch)
    assert predictor.calls == 2 if not prefetch else predictor.calls in (2, 3)
    assert not [t for t in threading.enumerate() if t.name in ("unet3d-model", "unet3d-prefetch")]


def test_cancel_error_is_the_cancelled_kind():
    assert CancelledError("cancelled").exit_code == 5


# --------------------------------------------------------------------------------------------------
# Test-time augmentation (mirroring)
# --------------------------------------------------------------------------------------------------
def equivariant(batch: np.ndarray) -> np.ndarray:
    """Per-voxel, so flipping the input flips the output: TTA must change nothing."""
    return np.concatenate([np.sqrt(np.abs(batch)), batch * 0.5], axis=-1)


@pytest.mark.parametrize("axes", [(0,), (2,), (0, 1), (0, 1, 2)])
@pytest.mark.parametrize("blend", BLENDS)
def test_tta_with_equivariant_predictor_equals_plain(axes, blend):
    image = coordinate_image((20, 18, 24))
    plain = Recorder(equivariant)
    augmented = Recorder(equivariant)
    window = WindowConfig((16, 16, 16), 0.5, blend, 2)
    expected = sliding_window_predict(image, plain, window)
    output = sliding_window_predict(image, augmented, window, mirror_axes=axes)
    np.testing.assert_allclose(output, expected, rtol=1e-6)
    assert augmented.calls == plain.calls * 2 ** len(axes)
    assert augmented.patches == plain.patches * 2 ** len(axes) == 8 * 2 ** len(axes)


def test_tta_flips_the_input_and_flips_back():
    image = coordinate_image((16, 16, 16))
    predictor = Recorder(lambda batch: batch.copy())
    output = sliding_window_predict(image, predictor, WindowConfig((16, 16, 16), 0.0, "constant", 1),
                                    mirror_axes=(0, 2))
    np.testing.assert_array_equal(output, image)  # identity survives flip -> predict -> flip back
    seen = [batch[0] for batch in predictor.inputs]
    expected = [image, np.flip(image, 0), np.flip(image, 2), np.flip(image, (0, 2))]
    for got, want in zip(seen, expected):
        np.testing.assert_array_equal(got, want)


def test_tta_averages_a_non_equivariant_predictor():
    # output = voxel index along x inside the patch; the mirrored pass sees it reversed, so the
    # average is (15 - i + i) / 2 = 7.5 at every voxel.
    def x_index(batch: np.ndarray) -> np.ndarray:
        index = np.arange(batch.shape[3], dtype=np.float32)
        return np.broadcast_to(index[:, np.newaxis], batch.shape[:4] + (1,)).copy()

    image = coordinate_image((16, 16, 16))
    output = sliding_window_predict(image, x_index, WindowConfig((16, 16, 16), 0.5, "gaussian", 1),
                                    mirror_axes=[2])
    np.testing.assert_allclose(output, np.full((16, 16, 16, 1), 7.5, np.float32), rtol=1e-6)
    plain = sliding_window_predict(image, x_index, WindowConfig((16, 16, 16), 0.5, "gaussian", 1))
    np.testing.assert_allclose(plain[..., 0], np.broadcast_to(np.arange(16.0), (16, 16, 16)),
                               rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
IMAGE = np.zeros((16, 16, 16, 1), np.float32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": np.zeros((16, 16, 16), np.float32)},
         "image must be 4-D channels-last (z, y, x, c), got 3-D shape (16, 16, 16); add a trailing "
         "channel axis for single-channel volumes"),
        ({"image": np.zeros((0, 16, 16, 1), np.float32)},
         "image must not have an empty axis, got shape (0, 16, 16, 1)"),
        ({"overlap": 1.2}, "overlap must be >= 0 and < 1, got 1.2"),
        ({"overlap": 1.0}, "overlap must be >= 0 and < 1, got 1.0"),
        ({"overlap": -0.1}, "overlap must be >= 0 and < 1, got -0.1"),
        ({"overlap": "half"}, "overlap must be a number, got 'half'"),
        ({"patch_size": (16, 16)},
         "patch size must be three positive integers (z, y, x), got (16, 16)"),
        ({"patch_size": (16, 0, 16)},
         "patch size must be three positive integers (z, y, x), got (16, 0, 16)"),
        ({"patch_size": (16, 16.5, 16)},
         "patch size must be three positive integers (z, y, x), got (16, 16.5, 16)"),
        ({"patch_size": 16}, "patch size must be three positive integers (z, y, x), got 16"),
        ({"batch_size": 0}, "batch size must be >= 1, got 0"),
        ({"batch_size": 1.5}, "batch size must be an integer >= 1, got 1.5"),
        ({"blend": "linear"}, "blend must be one of gaussian, constant, got 'linear'"),
        ({"mirror_axes": (0, 3)},
         "mirror axes must be a subset of (0, 1, 2) (z, y, x), got (0, 3)"),
        ({"expected_channels": 2},
         "image has 1 channel(s), the model expects 2; give one input volume per model input "
         "channel"),
        ({"predict": lambda batch: batch[..., 0]},
         "predictor returned shape (2, 16, 16, 16), expected (2, 16, 16, 16, k); it must map "
         "(n, z, y, x, channels) patches to (n, z, y, x, classes) outputs of the same size"),
        ({"predict": lambda batch: batch[:, :8]},
         "predictor returned shape (2, 8, 16, 16, 1), expected (2, 16, 16, 16, k); it must map "
         "(n, z, y, x, channels) patches to (n, z, y, x, classes) outputs of the same size"),
    ],
)
def test_validation_messages(kwargs, message):
    arguments = {"image": IMAGE, "predict": identity_like, "patch_size": (16, 16, 16),
                 "overlap": 0.5, "batch_size": 2, "skip_empty": False}
    if "predict" in kwargs:
        arguments["image"] = np.zeros((16, 16, 32, 1), np.float32)  # 3 patches: batches 2 + 1
    arguments.update(kwargs)
    with pytest.raises(BadInputError) as caught:
        sliding_window_predict(**arguments)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_predictor_changing_class_count_is_caught():
    calls = []

    def unstable(batch: np.ndarray) -> np.ndarray:
        calls.append(1)
        return np.zeros(batch.shape[:4] + (2 if len(calls) == 1 else 3,), np.float32)

    with pytest.raises(BadInputError, match=r"returned shape \(1, 16, 16, 16, 3\), expected "
                                            r"\(1, 16, 16, 16, 2\)"):
        sliding_window_predict(np.zeros((16, 16, 32, 1), np.float32), unstable, patch_size=(16, 16, 16),
                               overlap=0.5, batch_size=2, skip_empty=False)


def test_tile_starts_rejects_bad_overlap():
    with pytest.raises(BadInputError, match=r"^overlap must be >= 0 and < 1, got 1$"):
        tile_starts(100, 64, 1)


# --------------------------------------------------------------------------------------------------
# The window configuration
# --------------------------------------------------------------------------------------------------
def test_window_config_normalises_and_is_frozen():
    import dataclasses

    window = WindowConfig([16, 16.0, 8], 0, "Constant", np.int64(3), mirror_axes=[2, 0, 2])
    assert window == WindowConfig((16, 16, 8), 0.0, "constant", 3, mirror_axes=(0, 2))
    assert window.patch_size == (16, 16, 8) and isinstance(window.overlap, float)
    assert type(window.batch_size) is int and window.mirror_axes == (0, 2)
    assert WindowConfig(mirror_axes=None).mirror_axes == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        window.overlap = 0.5  # type: ignore[misc]


def test_window_defaults_are_the_declared_option_defaults():
    from UNet3DSegmentLib.base.options import SegmentOptions

    window = WindowConfig()
    for name in ("blend", "batch_size", "accumulation", "skip_empty"):
        assert getattr(window, name) == SegmentOptions.spec(name).default
    assert SegmentOptions.spec("overlap").default is None and window.overlap == 0.5  # no card, no user value
    assert window.mirror_axes == () and window.prefetch and window.expected_channels is None


def test_window_config_from_options():
    from UNet3DSegmentLib.base.options import SegmentOptions

    options = SegmentOptions(overlap=0.25, batch_size=4, blend="constant", tta=True, accumulation="float16",
                             skip_empty=False)
    window = WindowConfig.from_options(options, (8, 16, 16), prefetch=False)
    assert window == WindowConfig((8, 16, 16), 0.25, "constant", 4, mirror_axes=(0, 1, 2),
                                  accumulation="float16", prefetch=False, skip_empty=False)
    assert WindowConfig.from_options(SegmentOptions(), (16, 16, 16)).mirror_axes == ()


def test_keyword_fields_replace_those_of_the_config():
    image = coordinate_image((16, 16, 40))
    window = WindowConfig((16, 16, 16), 0.5, "constant", 2)
    calls = []
    sliding_window_predict(image, identity_like, window, progress=lambda d, t: calls.append((d, t)), batch_size=4)
    assert calls == [(4, 4)]  # one call of four patches, not two of two
    with pytest.raises(TypeError, match=r"^config must be a WindowConfig, got tuple"):
        sliding_window_predict(image, identity_like, (16, 16, 16))  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match=r"^expected channels must be an integer >= 1, got 0$"):
        WindowConfig(expected_channels=0)


def test_inference_runs_without_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from UNet3DSegmentLib.engine.window import sliding_window_predict\n"
        "sliding_window_predict(np.ones((8, 8, 8, 1), np.float32), lambda b: b, patch_size=(8, 8, 8))\n"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# Skipping tiles whose input is all zero (``skip_empty``)
def reference_blend_skipping(image, predict, patch, overlap, blend, flips=((),)):
    """float64 reference: tiles with an all-zero input are certain background (one-hot class 0)."""
    weights = importance_map(patch, blend).astype(np.float64)
    total, weight_sum, ran = None, np.zeros(image.shape[:3]), 0
    outputs = {}
    for z, y, x in grid_starts(image.shape[:3], patch, overlap):
        region = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
        if image[region].any():
            ran += 1
            tile = image[region][np.newaxis]
            out = sum(np.flip(predict(np.flip(tile, [a + 1 for a in axes]).copy()), [a + 1 for a in axes])
                      for axes in flips)[0].astype(np.float64) / len(flips)
            outputs[(z, y, x)] = out
        else:
            out = None
        if total is None:
            classes = 2
            total = np.zeros(image.shape[:3] + (classes,))
        if out is None:
            out = np.zeros(patch + (2,))
            out[..., 0] = 1.0
        total[region] += out * weights[..., np.newaxis]
        weight_sum[region] += weights
    return total / weight_sum[..., np.newaxis], ran


def two_class_softmax(batch: np.ndarray) -> np.ndarray:
    """A per-voxel, position-dependent two-class output that sums to 1 (like a softmax)."""
    pz, py, px = batch.shape[1:4]
    z, y, x = np.meshgrid(np.arange(pz), np.arange(py), np.arange(px), indexing="ij")
    score = batch[..., 0] + (z + 2 * y - x).astype(np.float32) / 16.0
    foreground = 1.0 / (1.0 + np.exp(-score))
    return np.stack([1.0 - foreground, foreground], axis=-1).astype(np.float32)


def blobs_image(shape=(40, 36, 44)) -> np.ndarray:
    """Zeros with two small non-zero blobs: most 16^3 tiles at overlap 0.5 are empty, runs alternate."""
    image = np.zeros(shape + (1,), np.float32)
    image[3:9, 4:12, 5:10, 0] = 1.5
    image[30:37, 20:31, 33:41, 0] = np.linspace(-2, 2, 7 * 11 * 8, dtype=np.float32).reshape(7, 11, 8)
    return image


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])  # 2 and 4: runs that straddle z rows (ring depth)
@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("mirror", [(), (0, 2)])
def test_skipped_empty_tiles_count_as_certain_background(batch_size, blend, mirror):
    image = blobs_image()
    seen = []

    def predict(batch):
        seen.append(batch.shape[0])
        return two_class_softmax(batch)

    progress = []
    output = sliding_window_predict(image, predict, patch_size=(16, 16, 16), overlap=0.5, blend=blend,
                                    batch_size=batch_size, mirror_axes=mirror, skip_empty=True,
                                    progress=lambda done, total: progress.append((done, total)))
    flips = [()] if not mirror else [axes for axes in ((), (0,), (2,), (0, 2))]
    expected, ran = reference_blend_skipping(image, two_class_softmax, (16, 16, 16), 0.5, blend, flips)
    np.testing.assert_allclose(output, expected, rtol=2e-5, atol=2e-6)
    starts = grid_starts(image.shape[:3], (16, 16, 16), 0.5)
    assert 0 < ran < len(starts) // 2  # most tiles were skipped
    assert sum(seen) == ran * len(flips)  # the model saw only the tiles with signal
    assert progress[-1] == (ran * len(flips), ran * len(flips))
    # Where only empty tiles reach, the answer is certain background.
    covered = np.zeros(image.shape[:3], bool)
    for z, y, x in starts:
        if image[z:z + 16, y:y + 16, x:x + 16].any():
            covered[z:z + 16, y:y + 16, x:x + 16] = True
    assert (~covered).sum() > 10_000 and output[~covered][:, 0].min() == 1.0


def test_skipping_changes_nothing_where_no_tile_is_empty():
    image = coordinate_image((20, 24, 28))
    skipping = sliding_window_predict(image, position_dependent, patch_size=(16, 16, 16), overlap=0.5,
                                      skip_empty=True)
    running = sliding_window_predict(image, position_dependent, patch_size=(16, 16, 16), overlap=0.5,
                                     skip_empty=False)
    np.testing.assert_array_equal(skipping, running)


def test_an_all_zero_image_still_runs_one_tile():
    calls = []

    def predict(batch):
        calls.append(batch.shape[0])
        return two_class_softmax(batch)

    output = sliding_window_predict(np.zeros((20, 20, 40, 1), np.float32), predict, patch_size=(16, 16, 16),
                                    overlap=0.5, batch_size=2, skip_empty=True)
    assert sum(calls) == 1 and output.shape == (20, 20, 40, 2)
    assert np.isfinite(output).all()


def test_no_overlap_means_the_default_in_the_window_and_an_error_in_the_tiling():
    from UNet3DSegmentLib.engine.tiling import tile_starts

    assert WindowConfig(overlap=None).overlap == 0.5
    with pytest.raises(BadInputError, match=r"^overlap must be a number >= 0 and < 1, got None$"):
        tile_starts(100, 16, None)


def test_tile_units_keep_order_and_split_runs():
    from UNet3DSegmentLib.engine.tiling import tile_units

    starts = [(0, 0, i) for i in range(7)]
    units = tile_units(starts, [False, False, False, True, True, False, True], 2)
    assert units == [(False, [(0, 0, 0), (0, 0, 1)]), (False, [(0, 0, 2)]), (True, [(0, 0, 3), (0, 0, 4)]),
                     (False, [(0, 0, 5)]), (True, [(0, 0, 6)])]
    assert [s for _, unit in units for s in unit] == starts


# --------------------------------------------------------------------------------------------------
# The whole pipeline: the card's recommended overlap, and the patches skipping saves
def test_pipeline_uses_the_cards_overlap_unless_the_user_gives_one(tmp_path):
    import copy

    import SimpleITK as sitk

    from conftest import TINY_CARD, save_tiny_model
    from UNet3DSegmentLib.base.options import SegmentOptions
    from UNet3DSegmentLib.engine.loading import load_model
    from UNet3DSegmentLib.engine.pipeline import segment_images
    from UNet3DSegmentLib.engine.tiling import count_patches

    card = copy.deepcopy(TINY_CARD)
    card["inference"] = {"overlap": 0.0}
    loaded = load_model(save_tiny_model(tmp_path, card=card, name="recommends"))
    plain = load_model(save_tiny_model(tmp_path, name="plain"))
    patch = tuple(card["input"]["patch_size"])
    array = np.random.default_rng(0).uniform(1, 2, (32, 24, 36)).astype(np.float32)  # no empty tile
    image = sitk.GetImageFromArray(array)
    fp32 = SegmentOptions(precision="fp32")
    assert segment_images([image], loaded, fp32).patches == count_patches(array.shape, patch, 0.0)
    assert segment_images([image], plain, fp32).patches == count_patches(array.shape, patch, 0.5)
    chosen = SegmentOptions(precision="fp32", overlap=0.25)
    assert segment_images([image], loaded, chosen).patches == count_patches(array.shape, patch, 0.25)
    assert count_patches(array.shape, patch, 0.0) < count_patches(array.shape, patch, 0.25) < count_patches(
        array.shape, patch, 0.5)

    # A zero border wide enough for whole tiles: the skipped ones are not run, and their voxels are background.
    padded = np.zeros((72, 24, 36), np.float32)
    padded[:32] = array
    skipping = segment_images([sitk.GetImageFromArray(padded)], plain, fp32)
    running = segment_images([sitk.GetImageFromArray(padded)], plain, SegmentOptions(precision="fp32", skip_empty=False))
    assert skipping.patches < running.patches == count_patches(padded.shape, patch, 0.5)
    labels = sitk.GetArrayFromImage(skipping.labels)
    assert not labels[56:].any()  # rows only empty tiles cover
    # Without zscore-nonzero or the crop a zero is a value (0 HU is water): no tile is skipped.
    raw = copy.deepcopy(TINY_CARD)
    raw["input"]["normalization"] = {"method": "none"}
    unnormalised = load_model(save_tiny_model(tmp_path, card=raw, name="raw"))
    assert segment_images([sitk.GetImageFromArray(padded)], unnormalised, fp32).patches == running.patches
