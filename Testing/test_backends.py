"""Keras backends: the same .keras model gives the same labelmap on TensorFlow and PyTorch.

PyTorch is an optional install (``pip install "unet3dsegment[torch]"``); without it the comparison is
skipped with that reason. Each backend runs in its own process: Keras picks its backend at import.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from UNet3DSegmentLib.runtime.backends import backend_installed, select_backend
from UNet3DSegmentLib.base.errors import BadInputError

HAS_TORCH = importlib.util.find_spec("torch") is not None


def run_segment(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_TORCH_DEVICE")}
    return subprocess.run([sys.executable, "-m", "UNet3DSegmentLib", "segment", *args], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("backends") / "input.nrrd"
    array = np.random.default_rng(21).normal(50, 10, size=(20, 26, 30)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def segment_with(backend: str, volume: Path, model: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of one fp32 run on ``backend`` (its own process)."""
    labels, probabilities = folder / f"{backend}.nrrd", folder / f"{backend}_p.nrrd"
    result = run_segment([str(volume), "-o", str(labels), "--model", str(model), "--backend", backend,
                          "--precision", "fp32", "--probabilities", str(probabilities), "--batch-size", "5",
                          "--progress", "none"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no framework chatter on any backend
    return (sitk.GetArrayFromImage(sitk.ReadImage(str(labels))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(probabilities))))


@pytest.fixture(scope="module")
def tensorflow_result(volume: Path, tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    return segment_with("tensorflow", volume, tiny_model_path, tmp_path_factory.mktemp("tensorflow"))


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_other_backends_give_the_same_labelmap(backend: str, tmp_path: Path, volume: Path, tiny_model_path: Path,
                                               tensorflow_result):
    if importlib.util.find_spec(backend) is None:
        hint = "pip install 'unet3dsegment[torch]'" if backend == "torch" else "pip install jax"
        pytest.skip(f"{backend} is not installed ({hint})")
    labels, probabilities = segment_with(backend, volume, tiny_model_path, tmp_path)
    tf_labels, tf_probabilities = tensorflow_result
    assert tf_probabilities.shape == (20, 26, 30, 4)
    np.testing.assert_allclose(probabilities, tf_probabilities, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(labels, tf_labels)
    assert len(np.unique(tf_labels)) > 1  # a real labelmap, not one class everywhere


def test_unknown_backend_is_refused():
    with pytest.raises(BadInputError, match=r"^backend must be one of tensorflow, torch, jax, got 'mxnet'$"):
        backend_installed("mxnet")
    with pytest.raises(BadInputError, match=r"^backend must be one of tensorflow, torch, jax, got 'caffe'$"):
        select_backend("caffe")


def test_backend_cannot_change_once_keras_runs():
    import keras

    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(BadInputError, match=r"^Keras already runs on the tensorflow backend in this process"):
        select_backend("torch")
    assert select_backend("tensorflow") == "tensorflow"


def test_missing_backend_names_the_install_command():
    if importlib.util.find_spec("jax") is not None:
        pytest.skip("JAX is installed here")
    code = "from UNet3DSegmentLib.runtime.backends import select_backend\nselect_backend('jax')\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "the jax backend is not installed; install it with: pip install jax" in result.stderr


def test_saved_model_needs_tensorflow(tmp_path: Path):
    """SavedModel folders are refused on the torch backend with the fix."""
    if not HAS_TORCH:
        pytest.skip("PyTorch is not installed (pip install 'unet3dsegment[torch]')")
    folder = tmp_path / "exported"
    (folder).mkdir()
    (folder / "saved_model.pb").write_bytes(b"")
    image = tmp_path / "in.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((16, 16, 16), np.float32)), str(image))
    result = run_segment([str(image), "-o", str(tmp_path / "o.nrrd"), "--model", str(folder), "--backend", "torch",
                          "--progress", "none"])
    assert result.returncode == 4, result.stderr
    assert "is a TensorFlow SavedModel, which only the tensorflow backend can run" in result.stderr


CPU_TWIN_PROBE = """
import json, sys
import numpy as np
from UNet3DSegmentLib.runtime.backends import select_backend
select_backend(sys.argv[1])
from UNet3DSegmentLib.engine.loading import load_model
from UNet3DSegmentLib.runtime.backends import configure_runtime
configure_runtime("cpu")
loaded = load_model(sys.argv[2], precision="fp32")
batch = np.random.default_rng(3).normal(size=(3, 16, 16, 16, 1)).astype(np.float32)
expected = loaded.predict(batch)
loaded.device = "gpu:0"  # pretend the model ran on a GPU, to get the out-of-memory CPU copy
twin = loaded.cpu_predictor()
got = twin.predict(batch)
devices = sorted({str(v.value.device).split(":")[0] for v in twin.keras_model.weights})
print(json.dumps({"device": twin.device, "precision": twin.precision, "separate": twin.keras_model is not
                  loaded.keras_model, "devices": devices, "difference": float(np.abs(got - expected).max())}))
"""


def test_torch_model_has_a_cpu_copy_for_the_out_of_memory_fallback(tiny_model_path: Path):
    """The GPU fallback's last step: a float32 copy of the network on the CPU, same probabilities."""
    if not HAS_TORCH:
        pytest.skip("PyTorch is not installed (pip install 'unet3dsegment[torch]')")
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_TORCH_DEVICE")}
    result = subprocess.run([sys.executable, "-c", CPU_TWIN_PROBE, "torch", str(tiny_model_path)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    report = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    assert report["device"] == "cpu" and report["precision"] == "fp32" and report["separate"]
    assert report["devices"] == ["cpu"]
    assert report["difference"] < 1e-6


def test_gpu_memory_limit_is_refused_on_jax_and_when_tiny():
    from UNet3DSegmentLib.runtime.backends import configure_runtime

    with pytest.raises(BadInputError, match=r"^a GPU memory limit is not available on the jax backend; set "
                                            r"XLA_PYTHON_CLIENT_MEM_FRACTION"):
        select_backend("jax", gpu_memory_limit=2**30)
    with pytest.raises(BadInputError, match=r"^gpu memory limit must be at least 1 MiB, got 1000$"):
        configure_runtime("cpu", gpu_memory_limit=1000)


def test_gpu_memory_limit_option(tmp_path: Path, tiny_model_path: Path, volume: Path):
    """Accepted as a size on the command line (no GPU here: nothing to cap, same result); bad sizes refused."""
    bad = run_segment([str(volume), "-o", str(tmp_path / "a.nrrd"), "--gpu-memory-limit", "lots"])
    assert bad.returncode == 3 and "--gpu-memory-limit" in bad.stderr
    good = run_segment([str(volume), "-o", str(tmp_path / "b.nrrd"), "--model", str(tiny_model_path),
                        "--gpu-memory-limit", "512M", "--progress", "none"])
    assert good.returncode == 0, good.stderr
    assert sitk.ReadImage(str(tmp_path / "b.nrrd")).GetSize() == (30, 26, 20)
