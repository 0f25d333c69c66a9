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

from UNet3DSegmentLib.backends import select_backend, validate_backend
from UNet3DSegmentLib.errors import BadInputError

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
        validate_backend("mxnet")


def test_backend_cannot_change_once_keras_runs():
    import keras

    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(BadInputError, match=r"^Keras already runs on the tensorflow backend in this process"):
        select_backend("torch")
    assert select_backend("tensorflow") == "tensorflow"


def test_missing_backend_names_the_install_command():
    if importlib.util.find_spec("jax") is not None:
        pytest.skip("JAX is installed here")
    code = "from UNet3DSegmentLib.backends import select_backend\nselect_backend('jax')\n"
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
