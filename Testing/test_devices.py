"""Devices: the out-of-memory fallback (smaller batch, then CPU), its progress warnings, --gpu checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from UNet3DSegmentLib.cli.main import main
from UNet3DSegmentLib.runtime.fallback import FallbackPredictor
from UNet3DSegmentLib.base.errors import EXIT_BAD_INPUT, OutOfMemoryError
from UNet3DSegmentLib.base.errors import is_out_of_memory
from UNet3DSegmentLib.engine.loading import load_model
from UNet3DSegmentLib.runtime.tensorflow_setup import configure_tensorflow


def doubling(batch: np.ndarray) -> np.ndarray:
    return np.concatenate([batch, 2 * batch], axis=-1)


class LimitedDevice:
    """A predictor that runs out of memory for batches larger than ``limit`` (0: always)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(batch.shape[0])
        if batch.shape[0] > self.limit:
            raise OutOfMemoryError(f"out of memory with {batch.shape[0]}")
        return doubling(batch)


BATCH = np.arange(4 * 2 * 2 * 2, dtype=np.float32).reshape(4, 2, 2, 2, 1)


def test_fallback_halves_the_batch_until_it_fits():
    device, warnings = LimitedDevice(1), []
    predictor = FallbackPredictor(device, device="gpu:0", warn=warnings.append)
    np.testing.assert_array_equal(predictor(BATCH), doubling(BATCH))
    np.testing.assert_array_equal(predictor(BATCH[:3]), doubling(BATCH[:3]))  # stays at 1 per call
    assert device.sizes == [4, 2, 1, 1, 1, 1, 1, 1, 1]
    assert warnings == [
        "out of memory on gpu:0 with 4 patches per model call; retrying with 2",
        "out of memory on gpu:0 with 2 patches per model call; retrying with 1",
    ]
    assert (predictor.rows, predictor.device) == (1, "gpu:0")


def test_fallback_moves_to_the_cpu_when_one_patch_does_not_fit():
    gpu, cpu, warnings = LimitedDevice(0), LimitedDevice(8), []
    predictor = FallbackPredictor(gpu, device="gpu:1", cpu_fallback=lambda: cpu, warn=warnings.append)
    np.testing.assert_array_equal(predictor(BATCH[:2]), doubling(BATCH[:2]))
    assert gpu.sizes == [2, 1] and cpu.sizes == [2]  # on the CPU the whole batch again
    assert warnings[-1] == "out of memory on gpu:1 with 1 patch per model call; continuing on the CPU (slower)"
    assert (predictor.rows, predictor.device) == (None, "cpu")


def test_fallback_gives_up_on_the_cpu_with_one_clear_error():
    predictor = FallbackPredictor(LimitedDevice(0), device="cpu", cpu_fallback=lambda: doubling)
    with pytest.raises(OutOfMemoryError, match=r"^out of memory on the CPU even with 1 patch per model call; close "
                                               r"other programs, or use a model with a smaller patch size"):
        predictor(BATCH[:2])


def test_out_of_memory_errors_of_each_backend_are_recognised():
    import tensorflow as tf

    assert is_out_of_memory(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("shapes do not match"))


def test_loaded_model_turns_resource_exhausted_into_out_of_memory(tiny_model_path: Path):
    import tensorflow as tf

    loaded = load_model(tiny_model_path)

    def exhausted(_x):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    loaded._function = exhausted
    with pytest.raises(OutOfMemoryError, match=r"out of memory predicting a batch of 2 patch\(es\) of 16x16x16 on cpu"):
        loaded.predict(np.zeros((2, 16, 16, 16, 1), np.float32))
    assert loaded.cpu_predictor() is None  # already on the CPU: nowhere to fall back to


def test_pipeline_reports_the_fallback_as_warning_events(tiny_model_path: Path):
    """Force a 'GPU' that fits one patch only: same labels as a normal run, and warning events."""
    from UNet3DSegmentLib.engine.pipeline import SegmentOptions, segment_images

    rng = np.random.default_rng(5)
    image = sitk.GetImageFromArray(rng.normal(50, 10, size=(20, 24, 30)).astype(np.float32))
    options = SegmentOptions(overlap=0.5, batch_size=4, precision="fp32", blend_on="host")  # the host fallback
    reference = segment_images([image], load_model(tiny_model_path), options)

    loaded = load_model(tiny_model_path)
    real = loaded.predict
    loaded.device = "gpu:0"

    def small_gpu(batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] > 1:
            raise OutOfMemoryError("out of memory")
        return real(batch)

    loaded.predict = small_gpu  # type: ignore[method-assign]
    events: list[dict] = []
    result = segment_images([image], loaded, options, progress=events.append)
    warnings = [e["message"] for e in events if e["stage"] == "warning"]
    assert warnings == [
        "out of memory on gpu:0 with 4 patches per model call; retrying with 2",
        "out of memory on gpu:0 with 2 patches per model call; retrying with 1",
    ]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labels), sitk.GetArrayFromImage(reference.labels))
    assert [e["done"] for e in events if e["stage"] == "inference"] == [4, 8, 12]


def test_gpu_option_is_checked(tmp_path: Path, capsys):
    assert main(["segment", "in.nrrd", "-o", str(tmp_path / "o.nrrd"), "--gpu", "-1"]) == EXIT_BAD_INPUT
    assert "gpu index must be >= 0, got -1" in capsys.readouterr().err


def test_gpu_index_without_a_gpu():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible here")
    assert configure_tensorflow("auto", gpu_index=3) == "cpu"  # auto: no GPU, so the CPU


def test_cpu_allocation_failure_of_pytorch_is_recognised():
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                                          "allocate memory: you tried to allocate 68719476736 bytes."))
