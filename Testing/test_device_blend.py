"""Blending on the model's device (``blend_on device``) gives the host path's answer.

TensorFlow on the CPU runs the same code as on a GPU: a tiny Keras model, volumes of ~40^3 and 16^3
patches. The host path (``window.sliding_window_predict`` + argmax) is the reference: probabilities
within 1e-5, labels equal. PyTorch and JAX run in a child process, when installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from UNet3DSegmentLib.base.errors import BadInputError, CancelledError, OutOfMemoryError
from UNet3DSegmentLib.base.options import SegmentOptions
from UNet3DSegmentLib.engine.device_window import blend_on_device, device_sliding_window
from UNet3DSegmentLib.engine.postprocessing import labels_from_probabilities
from UNet3DSegmentLib.engine.tiling import count_patches
from UNet3DSegmentLib.engine.window import WindowConfig, sliding_window_predict
from UNet3DSegmentLib.runtime.device_blend import device_blender

tf = pytest.importorskip("tensorflow")

PATCH = (16, 16, 16)
CLASSES = 3
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model():
    """Two 3^3 convolutions and a softmax: zero padding makes each output depend on where the tile is."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input(PATCH + (1,))
    hidden = keras.layers.Conv3D(4, 3, padding="same", activation="tanh")(inputs)
    outputs = keras.layers.Conv3D(CLASSES, 3, padding="same", activation="softmax")(hidden)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def host_predict(model):
    from UNet3DSegmentLib.runtime.predictors import TensorflowForward

    return TensorflowForward(model, PATCH, 1)


def blender_for(model, accumulation: str = "float32", classes: int = CLASSES):
    def make(shape, weights, flips):
        return device_blender("tensorflow", model, shape, classes, weights, accumulation, flips)

    return make


def volume(shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, size=tuple(shape) + (1,)).astype(np.float32)


def compare(model, host_predict, image, **fields):
    """Run both paths with the same config; check probabilities, labels and maximum probability agree."""
    config = WindowConfig(patch_size=PATCH, prefetch=False, **fields)
    host_progress, device_progress = [], []
    reference = sliding_window_predict(image, host_predict, config,
                                       progress=lambda d, t: host_progress.append((d, t)))
    result = device_sliding_window(image, blender_for(model, config.accumulation), config,
                                   progress=lambda d, t: device_progress.append((d, t)),
                                   keep_probabilities=True, max_probability=True)
    assert result.probabilities.shape == reference.shape
    assert result.probabilities.dtype == np.float32
    tolerance = TOLERANCE if config.accumulation == "float32" else 2e-3
    assert np.abs(result.probabilities - reference).max() < tolerance
    assert result.labels.dtype == np.uint8
    np.testing.assert_array_equal(result.labels, labels_from_probabilities(reference))
    assert result.max_probability.dtype == np.float16
    np.testing.assert_allclose(result.max_probability, reference.max(axis=-1).astype(np.float16), atol=2e-3)
    assert device_progress == host_progress
    return result, device_progress


# --------------------------------------------------------------------------------------------------
# Device path == host path
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_device_equals_host(model, host_predict, blend, overlap, batch_size):
    image = volume((40, 20, 36))
    _, progress = compare(model, host_predict, image, blend=blend, overlap=overlap, batch_size=batch_size,
                          skip_empty=False)
    tiles = count_patches(image.shape[:3], PATCH, overlap)
    assert progress[-1] == (tiles, tiles)
    assert len(progress) == -(-tiles // batch_size)  # one step per predictor call, the last batch ragged
    if overlap == 0.5 and batch_size == 3:
        assert tiles % 3 != 0


def test_padding_of_a_volume_smaller_than_the_patch(model, host_predict):
    result, _ = compare(model, host_predict, volume((10, 40, 13), seed=1), overlap=0.5, skip_empty=False)
    assert result.labels.shape == (10, 40, 13)


@pytest.mark.parametrize("axes", [(0, 1, 2), (1,)])
def test_test_time_mirroring(model, host_predict, axes):
    image = volume((24, 20, 18), seed=2)
    _, progress = compare(model, host_predict, image, overlap=0.5, batch_size=2, mirror_axes=axes,
                          skip_empty=False)
    tiles = count_patches(image.shape[:3], PATCH, 0.5)
    assert progress[-1] == (tiles * 2 ** len(axes),) * 2


def test_float16_sums(model, host_predict):
    compare(model, host_predict, volume((24, 20, 18), seed=3), overlap=0.5, accumulation="float16",
            skip_empty=False)


def test_empty_tiles_are_background_as_on_the_host(model, host_predict):
    image = np.zeros((40, 20, 36, 1), np.float32)
    image[22:40, 8:20, 20:36] = volume((18, 12, 16), seed=4)  # one corner holds data: many tiles are all zero
    config = WindowConfig(patch_size=PATCH, overlap=0.5, batch_size=3)
    assert config.skip_empty
    _, progress = compare(model, host_predict, image, overlap=0.5, batch_size=3, skip_empty=True)
    tiles = count_patches(image.shape[:3], PATCH, 0.5)
    assert 0 < progress[-1][1] < tiles  # some tiles ran, some were skipped


def test_all_empty_volume_runs_one_tile(model, host_predict):
    result, progress = compare(model, host_predict, np.zeros((20, 20, 20, 1), np.float32), overlap=0.5,
                               skip_empty=True, mirror_axes=(0,))
    assert progress == [(1, 2), (2, 2)]
    assert result.labels.shape == (20, 20, 20)


def test_background_tiles_count_every_pass(model):
    """A volume of skipped tiles averages to one-hot background even with test-time passes."""
    blender = blender_for(model)((20, 16, 16), np.full(PATCH, 0.5, np.float32), [(), (1,), (2,), (1, 2)])
    blender.add_background([(0, 0, 0), (4, 0, 0)])
    probabilities = blender.probabilities()
    np.testing.assert_allclose(probabilities[..., 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(probabilities[..., 1:], 0.0, atol=1e-6)
    assert not blender.labels().any()


def test_labels_take_the_lowest_label_on_ties(model):
    blender = blender_for(model)((16, 16, 16), np.ones(PATCH, np.float32), [()])
    blender._blend(tf.fill((1,) + PATCH + (CLASSES,), 0.5), np.zeros((1, 3), np.int32))
    assert not blender.labels().any()


def test_crop_of_results(model, host_predict):
    image = volume((20, 18, 17), seed=5)
    blender = blender_for(model)((20, 18, 17), np.ones(PATCH, np.float32), [()])
    from UNet3DSegmentLib.engine.tiling import grid_starts

    starts = grid_starts((20, 18, 17), PATCH, 0.0)
    blender.add_batch(np.stack([image[z:z + 16, y:y + 16, x:x + 16] for z, y, x in starts]), starts)
    crop = (slice(2, 19), slice(None), slice(1, 9))
    np.testing.assert_array_equal(blender.labels(crop), blender.labels()[crop])
    np.testing.assert_array_equal(blender.probabilities(crop), blender.probabilities()[crop])


def test_results_are_worked_out_in_chunks(model, host_predict, monkeypatch):
    from UNet3DSegmentLib.runtime import device_blend

    image = volume((24, 20, 18), seed=6)
    whole = device_sliding_window(image, blender_for(model), patch_size=PATCH, keep_probabilities=True)
    monkeypatch.setattr(device_blend, "CHUNK_VOXELS", 20 * 18 * CLASSES * 5)  # 5 rows per chunk
    chunked = device_sliding_window(image, blender_for(model), patch_size=PATCH, keep_probabilities=True,
                                    max_probability=True)
    np.testing.assert_array_equal(chunked.labels, whole.labels)
    np.testing.assert_array_equal(chunked.probabilities, whole.probabilities)
    assert chunked.max_probability.shape == (24, 20, 18)


def test_only_what_is_asked_comes_back(model):
    result = device_sliding_window(volume((20, 20, 20)), blender_for(model), patch_size=PATCH)
    assert result.probabilities is None and result.max_probability is None
    assert result.labels.shape == (20, 20, 20)


def test_the_tensorflow_functions_trace_once(model):
    from UNet3DSegmentLib.runtime.device_blend import _tensorflow_forward

    made = []

    def make(shape, weights, flips):
        made.append(device_blender("tensorflow", model, shape, CLASSES, weights, "float32", flips))
        return made[-1]

    device_sliding_window(volume((40, 20, 36)), make, patch_size=PATCH, batch_size=3, overlap=0.5)
    device_sliding_window(volume((30, 20, 20)), make, patch_size=PATCH, batch_size=3, overlap=0.5)
    assert made[0]._blend_function.experimental_get_tracing_count() == 1  # ragged batches: no retracing
    assert _tensorflow_forward(model, PATCH, 1).experimental_get_tracing_count() == 1  # shared by volumes


# --------------------------------------------------------------------------------------------------
# Cancel, errors
# --------------------------------------------------------------------------------------------------
def test_cancel_before_start_makes_nothing(model):
    cancel = threading.Event()
    cancel.set()
    made = []
    with pytest.raises(CancelledError, match="cancelled after 0 of"):
        device_sliding_window(volume((20, 20, 20)), lambda *a: made.append(a), patch_size=PATCH, cancel=cancel)
    assert made == []


def test_cancel_during_run_stops_after_the_batch(model):
    cancel = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        cancel.set()

    with pytest.raises(CancelledError, match=r"^cancelled after 2 of 27 patches$"):
        device_sliding_window(volume((40, 40, 40)), blender_for(model), patch_size=PATCH, overlap=0.0,
                              batch_size=2, progress=progress, cancel=cancel)
    assert calls == [2]


def test_wrong_class_count_is_refused(model):
    with pytest.raises(BadInputError, match=r"the model returned shape \(1, 16, 16, 16, 3\), expected "
                                            r"\(1, 16, 16, 16, 5\)"):
        device_sliding_window(volume((16, 16, 16)), blender_for(model, classes=5), patch_size=PATCH)


def test_bad_batch_shape_is_refused(model):
    blender = blender_for(model)((16, 16, 16), np.ones(PATCH, np.float32), [()])
    with pytest.raises(BadInputError, match="a batch must be"):
        blender.add_batch(np.zeros((2, 8, 16, 16, 1), np.float32), [(0, 0, 0), (0, 0, 0)])


def test_out_of_memory_becomes_the_engine_kind(model, monkeypatch):
    blender = blender_for(model)((16, 16, 16), np.ones(PATCH, np.float32), [()])

    def exhausted(*arguments, **keywords):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    monkeypatch.setattr(blender, "_predict", exhausted)
    with pytest.raises(OutOfMemoryError, match="out of memory blending on the device"):
        blender.add_batch(np.zeros((1,) + PATCH + (1,), np.float32), [(0, 0, 0)])
    monkeypatch.setattr(blender, "_labels", exhausted)
    with pytest.raises(OutOfMemoryError, match=r"^out of memory blending on the device \(ResourceExhaustedError\)$"):
        blender.labels()
    monkeypatch.setattr(tf, "Variable", exhausted)  # the sums do not fit
    with pytest.raises(OutOfMemoryError, match="out of memory blending on the device"):
        blender_for(model)((16, 16, 16), np.ones(PATCH, np.float32), [()])


def small_device(model, fits: int):
    """Blenders whose model runs out of memory above ``fits`` patches per call."""

    def make(shape, weights, flips):
        blender = blender_for(model)(shape, weights, flips)
        real = blender._predict

        def predict(patches):
            if len(patches) > fits:
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
            return real(patches)

        blender._predict = predict
        return blender

    return make


def test_out_of_memory_in_the_model_halves_the_batch(model, host_predict):
    image = volume((40, 20, 36), seed=7)
    config = WindowConfig(patch_size=PATCH, overlap=0.5, batch_size=4, skip_empty=False)
    warnings, progress = [], []
    result = device_sliding_window(image, small_device(model, 1), config, progress=lambda d, t: progress.append(d),
                                   keep_probabilities=True, warn=warnings.append, device="gpu:0")
    assert warnings == ["out of memory on gpu:0 with 4 patches per model call; retrying with 2",
                        "out of memory on gpu:0 with 2 patches per model call; retrying with 1"]
    assert np.abs(result.probabilities - sliding_window_predict(image, host_predict, config)).max() < TOLERANCE
    assert progress == list(range(4, 33, 4))  # progress still per batch of the window


def test_out_of_memory_with_one_patch_or_while_adding_is_raised(model, monkeypatch):
    with pytest.raises(OutOfMemoryError, match="out of memory blending on the device"):
        device_sliding_window(volume((20, 20, 20)), small_device(model, 0), patch_size=PATCH, batch_size=2)

    def make(shape, weights, flips):
        blender = blender_for(model)(shape, weights, flips)

        def blend(*arguments):
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

        blender._blend = blend
        return blender

    warnings = []
    with pytest.raises(OutOfMemoryError):  # the sums may hold part of the batch: no retry
        device_sliding_window(volume((20, 20, 20)), make, patch_size=PATCH, batch_size=2, warn=warnings.append)
    assert warnings == []


def test_unknown_backend_is_refused(model):
    with pytest.raises(BadInputError, match="tensorflow, torch or jax"):
        device_blender("numpy", model, (16, 16, 16), CLASSES, np.ones(PATCH, np.float32))


# --------------------------------------------------------------------------------------------------
# The option and the pipeline
# --------------------------------------------------------------------------------------------------
def test_blend_on_option():
    assert SegmentOptions().blend_on == "auto"
    assert SegmentOptions.spec("blend_on").group == "runtime"
    assert blend_on_device("auto", "gpu:0") and not blend_on_device("auto", "cpu")
    assert blend_on_device("device", "cpu") and not blend_on_device("host", "gpu:1")
    with pytest.raises(BadInputError, match="blend on must be one of auto, host, device, got 'gpu'"):
        SegmentOptions(blend_on="gpu")
    assert SegmentOptions(blend_on="device").to_argv() == ["--blend-on", "device"]


@pytest.fixture(scope="module")
def loaded(tiny_model_path):
    from UNet3DSegmentLib.engine.loading import load_model

    return load_model(tiny_model_path, precision="fp32")


def _segment(loaded, blend_on, keep=False, **options):
    import SimpleITK as sitk

    from conftest import oblique_anisotropic_image
    from UNet3DSegmentLib.engine.pipeline import segment_images

    events = []
    image = oblique_anisotropic_image((20, 24, 28))
    array = sitk.GetArrayFromImage(image)
    array[:, :, :16] = 0  # an empty slab as wide as a patch: tiles skipped on both paths
    zeroed = sitk.GetImageFromArray(array)
    zeroed.CopyInformation(image)
    result = segment_images([zeroed], loaded, SegmentOptions(blend_on=blend_on, precision="fp32", **options),
                            progress=events.append, keep_probabilities=keep)
    return result, events


def inference_steps(events):
    return [(e["done"], e["total"]) for e in events if e["stage"] == "inference"]


def assert_same_statistics(rows, expected):
    assert [r.keys() for r in rows] == [r.keys() for r in expected]
    for row, other in zip(rows, expected):
        for key, value in other.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key
            else:
                assert row[key] == value, key


@pytest.mark.parametrize("keep", [False, True])
def test_pipeline_device_equals_host(loaded, keep):
    import SimpleITK as sitk

    host, host_events = _segment(loaded, "host", keep)
    device, device_events = _segment(loaded, "device", keep)
    labels = sitk.GetArrayFromImage(device.labels)
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(host.labels))
    assert len(np.unique(labels)) > 1  # a labelmap with something in it, not only background
    assert (device.labels.GetOrigin(), device.labels.GetDirection()) == (host.labels.GetOrigin(),
                                                                         host.labels.GetDirection())
    assert_same_statistics(device.statistics, host.statistics)
    assert device.patches == host.patches
    assert device.patches < count_patches((20, 24, 28), loaded.patch_size, 0.5)  # some tiles were skipped
    assert inference_steps(device_events) == inference_steps(host_events)
    if keep:
        assert np.abs(device.probabilities - host.probabilities).max() < TOLERANCE
    else:
        assert device.probabilities is None


def test_pipeline_device_with_largest_component_and_tta(loaded):
    import SimpleITK as sitk

    host, _ = _segment(loaded, "host", largest_component=True, tta=True)
    device, _ = _segment(loaded, "device", largest_component=True, tta=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(device.labels), sitk.GetArrayFromImage(host.labels))
    assert_same_statistics(device.statistics, host.statistics)


def test_auto_blends_on_the_device_only_for_a_gpu_model(loaded, monkeypatch):
    import dataclasses

    from UNet3DSegmentLib.engine import device_window

    calls = []
    real = device_window.device_sliding_window

    def spy(*arguments, **keywords):
        calls.append(keywords)
        return real(*arguments, **keywords)

    monkeypatch.setattr(device_window, "device_sliding_window", spy)
    _segment(loaded, "auto")
    assert calls == []
    _segment(dataclasses.replace(loaded, device="gpu:0"), "auto")  # a model reported on a GPU
    assert [(c["keep_probabilities"], c["max_probability"], c["device"]) for c in calls] == [(False, True, "gpu:0")]


def test_out_of_memory_on_the_device_falls_back_to_the_host(loaded, monkeypatch):
    import SimpleITK as sitk

    from UNet3DSegmentLib.engine import device_window

    def exhausted(*arguments, **keywords):
        raise OutOfMemoryError("out of memory blending on the device (ResourceExhaustedError)")

    monkeypatch.setattr(device_window, "device_sliding_window", exhausted)
    result, events = _segment(loaded, "device")
    warnings = [e["message"] for e in events if e["stage"] == "warning" and "blending" in e["message"]]
    assert warnings == ["out of memory blending on the device (ResourceExhaustedError); blending on the host instead"]
    host, _ = _segment(loaded, "host")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labels), sitk.GetArrayFromImage(host.labels))


def test_device_path_needs_a_keras_model():
    from UNet3DSegmentLib.engine.device_window import model_blender

    with pytest.raises(BadInputError, match="use --blend-on host"):
        model_blender(object(), "float32")


# --------------------------------------------------------------------------------------------------
# PyTorch and JAX (optional installs): a child process, since Keras picks its backend at import
# --------------------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import numpy as np, keras
    from UNet3DSegmentLib.engine.device_window import device_sliding_window
    from UNet3DSegmentLib.engine.window import WindowConfig, sliding_window_predict
    from UNet3DSegmentLib.engine.postprocessing import labels_from_probabilities
    from UNet3DSegmentLib.runtime.device_blend import device_blender
    from UNet3DSegmentLib.runtime.predictors import forward_for

    backend = keras.backend.backend()
    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 16, 1))
    hidden = keras.layers.Conv3D(4, 3, padding="same", activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Conv3D(3, 3, padding="same", activation="softmax")(hidden))
    image = np.zeros((40, 20, 36, 1), np.float32)
    image[10:40, 4:20] = np.random.default_rng(0).normal(size=(30, 16, 36, 1))
    for fields in ({}, {"mirror_axes": (0, 2), "accumulation": "float16", "blend": "constant", "overlap": 0.0}):
        config = WindowConfig(patch_size=(16, 16, 16), overlap=fields.pop("overlap", 0.5), batch_size=3,
                              prefetch=False, **fields)
        host = sliding_window_predict(image, forward_for(backend, model, (16, 16, 16), 1), config)
        make = lambda shape, w, flips: device_blender(backend, model, shape, 3, w, config.accumulation, flips)
        result = device_sliding_window(image, make, config, keep_probabilities=True)
        tolerance = 1e-5 if config.accumulation == "float32" else 2e-3
        assert np.abs(result.probabilities - host).max() < tolerance, np.abs(result.probabilities - host).max()
        assert (result.labels == labels_from_probabilities(host)).all()
    print("ok", backend)
""")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_other_backends_equal_the_host(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(root / "UNet3DSegment"))
    run = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert f"ok {backend}" in run.stdout
