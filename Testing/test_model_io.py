"""Model loading (.keras, .h5 full and weights-only, SavedModel), card checks, and the predictor."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CARD, TINY_PATCH

from UNet3DSegmentLib.base.errors import BadInputError, BadModelError
from UNet3DSegmentLib.engine.card import card_from_dict, card_path_for_model
from UNet3DSegmentLib.engine.loading import LoadedModel, load_model
from UNet3DSegmentLib.runtime.tensorflow_setup import configure_tensorflow


def batch(n: int, channels: int = 1, patch=TINY_PATCH, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *patch, channels)).astype(np.float32)


def write_card(model_path: Path, card: dict) -> Path:
    path = card_path_for_model(model_path)
    path.write_text(json.dumps(card), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path):
    """The tiny model as Keras loads it, and its output on a fixed batch: the numbers to reproduce."""
    import keras

    model = keras.saving.load_model(tiny_model_path, compile=False)
    x = batch(3)
    return model, x, model(x, training=False).numpy()


@pytest.fixture(scope="module")
def loaded(tiny_model_path: Path) -> LoadedModel:
    return load_model(tiny_model_path)


# ------------------------------------------------------------------------------------------------
# TensorFlow configuration


def test_configure_tensorflow_in_a_fresh_process():
    # Threads can only be set before TensorFlow starts, so check them in a process of their own.
    script = (
        "import logging, tensorflow as tf\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from UNet3DSegmentLib.runtime.tensorflow_setup import configure_tensorflow as c\n"
        "print(c('cpu', threads=1), c('cpu', threads=1))\n"
        "print(tf.config.threading.get_intra_op_parallelism_threads(),"
        " tf.config.threading.get_inter_op_parallelism_threads(),"
        " len(tf.config.get_visible_devices('GPU')))\n"
        "tf.constant(1.0) + 1.0\n"
        "print(c('auto', threads=2))\n"
        "print(tf.config.threading.get_intra_op_parallelism_threads())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == ["cpu cpu", "1 1 0", "cpu", "1"]
    assert "could not be applied" in result.stderr  # the late request is reported, not silently lost


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"device": "cuda"}, "device must be one of auto, cpu, gpu, got 'cuda'"),
        ({"threads": 0}, "threads must be >= 1, got 0"),
        ({"gpu_index": -1}, "gpu index must be >= 0, got -1"),
        ({"gpu_memory_limit": 5}, "gpu memory limit must be at least 1 MiB, got 5"),
    ],
)
def test_configure_tensorflow_rejects_bad_options(kwargs, message):
    with pytest.raises(BadInputError, match=message):
        configure_tensorflow(**kwargs)


def test_configure_tensorflow_gpu_without_gpu():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible here")
    with pytest.raises(BadInputError, match="device gpu was requested but TensorFlow sees no GPU"):
        configure_tensorflow("gpu")
    assert configure_tensorflow("auto") == "cpu"


def test_loading_uses_the_one_record_of_the_device(loaded: LoadedModel):
    from UNet3DSegmentLib.runtime.backends import ensure_configured
    from UNet3DSegmentLib.runtime.state import device_in_effect

    assert device_in_effect("tensorflow") == device_in_effect() == loaded.device
    assert ensure_configured() == loaded.device  # configured once: asking again changes nothing


# ------------------------------------------------------------------------------------------------
# .keras and the predictor


def test_keras_file_with_its_card(loaded: LoadedModel, tiny_model_path: Path):
    assert loaded.card == card_from_dict(TINY_CARD)
    assert loaded.card_path == tiny_model_path.with_suffix(".json")
    assert loaded.uses_default_card is False
    assert loaded.path == tiny_model_path
    assert (loaded.patch_size, loaded.in_channels, loaded.num_classes) == ((16, 16, 16), 1, 4)


def test_predict_equals_model_call(loaded: LoadedModel, reference):
    _, x, expected = reference
    y = loaded.predict(x)
    assert y.shape == (3, 16, 16, 16, 4) and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(y.argmax(-1), expected.argmax(-1))
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(loaded(x[:1]), loaded.predict(x[:1]))  # callable predictor


def test_predict_traces_once_for_any_batch_size(loaded: LoadedModel, reference):
    _, x, expected = reference
    for n in (1, 2, 3, 1):
        np.testing.assert_allclose(loaded.predict(x[:n]), expected[:n], rtol=0, atol=1e-6)
    assert loaded._function.function.experimental_get_tracing_count() == 1


def test_predict_converts_to_float32(loaded: LoadedModel, reference):
    _, x, expected = reference
    y = loaded.predict(x[:2].astype(np.float64))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected[:2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 16, 16, 16, 2), (1, 16, 16, 8, 1), (16, 16, 16, 1)])
def test_predict_rejects_wrong_shapes(loaded: LoadedModel, shape):
    with pytest.raises(BadInputError, match=r"must have shape \(n, 16, 16, 16, 1\)"):
        loaded.predict(np.zeros(shape, np.float32))


def test_keras_file_without_card_gets_defaults_shaped_after_the_model(tmp_path: Path, reference):
    model, x, expected = reference
    path = tmp_path / "nocard.keras"
    model.save(path)
    result = load_model(path)
    assert result.uses_default_card and result.card_path is None
    assert result.card.input.channels == ("image",)
    assert result.card.patch_size == (16, 16, 16)
    assert result.card.class_names == ("Background", "Class 1", "Class 2", "Class 3")
    np.testing.assert_allclose(result.predict(x), expected, rtol=0, atol=1e-6)


def test_explicit_card_wins_over_the_file_beside(tmp_path: Path, reference):
    model, _, _ = reference
    path = tmp_path / "m.keras"
    model.save(path)
    write_card(path, {**TINY_CARD, "classes": TINY_CARD["classes"][:3]})  # wrong card beside
    data = copy.deepcopy(TINY_CARD)
    data["name"] = "explicit"
    result = load_model(path, card=card_from_dict(data))
    assert result.card.name == "explicit" and result.card_path is None and not result.uses_default_card


def test_lambda_layer_is_refused(tmp_path: Path):
    import keras

    inputs = keras.Input((16, 16, 16, 1))
    outputs = keras.layers.Lambda(lambda t: t * 0.5)(inputs)
    model = keras.Model(inputs, outputs)
    for name in ("lambda.keras", "lambda.h5"):
        model.save(tmp_path / name)
        refused = rf"^model {name} contains a Lambda layer .* refused for safety"
        with pytest.raises(BadModelError, match=refused):
            load_model(tmp_path / name)


# ------------------------------------------------------------------------------------------------
# Legacy .h5 and SavedModel


def test_h5_full_model(tmp_path: Path, reference):
    model, x, expected = reference
    path = tmp_path / "full.h5"
    model.save(path)
    write_card(path, TINY_CARD)
    result = load_model(path)
    assert result.card == card_from_dict(TINY_CARD)
    np.testing.assert_allclose(result.predict(x), expected, rtol=0, atol=1e-6)


def test_h5_weights_only_keras2_layout(tmp_path: Path, reference):
    # What Keras 2's model.save_weights("x.h5") wrote: weights by layer, no model_config.
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    model, x, expected = reference
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    write_card(path, TINY_CARD)
    result = load_model(path)
    assert result.keras_model is not model
    np.testing.assert_allclose(result.predict(x), expected, rtol=0, atol=1e-6)


def test_h5_weights_only_keras3_layout(tmp_path: Path, reference):
    model, x, expected = reference
    path = tmp_path / "tiny.weights.h5"
    model.save_weights(path)
    write_card(path, TINY_CARD)  # tiny.weights.json
    result = load_model(path)
    np.testing.assert_allclose(result.predict(x), expected, rtol=0, atol=1e-6)


def test_h5_weights_only_that_do_not_fit_the_card(tmp_path: Path, reference):
    model, _, _ = reference
    path = tmp_path / "tiny.weights.h5"
    model.save_weights(path)
    seed = r"do not fit the seed network with base_filters=32, 1 input channel\(s\), 4 classes"
    with pytest.raises(BadModelError, match=seed + ".*write a model card beside it"):
        load_model(path)  # no card: seed defaults (32 filters) cannot take 2-filter weights
    data = copy.deepcopy(TINY_CARD)
    data["network"]["base_filters"] = 4
    with pytest.raises(BadModelError, match="base_filters=4.*fix the card's network"):
        load_model(path, card_from_dict(data))
    data["network"] = {"architecture": "resunet", "base_filters": 2}
    with pytest.raises(BadModelError, match="network.architecture is 'resunet'; only 'unet3d-seed'"):
        load_model(path, card_from_dict(data))


def test_saved_model_folder(tmp_path: Path, reference):
    model, x, expected = reference
    folder = tmp_path / "exported"
    model.export(folder, verbose=False)
    write_card(folder, TINY_CARD)  # exported.json beside the folder
    result = load_model(folder)
    assert result.card_path == tmp_path / "exported.json"
    assert tuple(result.keras_model.inputs[0].shape) == (None, 16, 16, 16, 1)
    y = result.predict(x)
    assert y.shape == (3, 16, 16, 16, 4) and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)
    with pytest.raises(BadModelError, match="model card says 3 classes but exported outputs 4 channels"):
        load_model(folder, card_from_dict({**TINY_CARD, "classes": TINY_CARD["classes"][:3]}))


# ------------------------------------------------------------------------------------------------
# Unusable files and contradictions


def test_unusable_files(tmp_path: Path):
    with pytest.raises(BadModelError, match="not found; check the path"):
        load_model(tmp_path / "missing.keras")
    (tmp_path / "model.pt").write_bytes(b"\0")
    with pytest.raises(BadModelError, match=r"unknown format '.pt'; use a Keras .keras file, a legacy .h5"):
        load_model(tmp_path / "model.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(BadModelError, match=r"is not a TensorFlow SavedModel \(no saved_model.pb\)"):
        load_model(tmp_path / "folder")
    (tmp_path / "broken.keras").write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.raises(BadModelError, match=r"^model broken.keras cannot be read .*save the model again"):
        load_model(tmp_path / "broken.keras")
    (tmp_path / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    with pytest.raises(BadModelError, match=r"^model broken.h5 is not a readable HDF5 file"):
        load_model(tmp_path / "broken.h5")


def test_card_beside_model_that_is_invalid(tmp_path: Path, reference):
    model, _, _ = reference
    path = tmp_path / "tiny.keras"
    model.save(path)
    bad = copy.deepcopy(TINY_CARD)
    bad["input"]["patch_size"] = [15, 16, 16]
    write_card(path, bad)
    with pytest.raises(BadModelError, match=r"model card tiny.json: input.patch_size must be three multiples"):
        load_model(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"classes": TINY_CARD["classes"][:3]},
         "model card says 3 classes but tiny.keras outputs 4 channels; fix the card's classes list"),
        ({"input": {**TINY_CARD["input"], "channels": ["T1", "T2"]}},
         "model card says 2 input channel(s) but tiny.keras takes 1; fix the card's input.channels list"),
        ({"input": {**TINY_CARD["input"], "patch_size": [32, 16, 16]}},
         "model card says patch_size [32, 16, 16] but tiny.keras takes patches of [16, 16, 16] (z, y, x); "
         "set input.patch_size to match"),
    ],
)
def test_card_contradicting_the_model(tiny_model_path: Path, change, message):
    card = card_from_dict({**TINY_CARD, **change})
    with pytest.raises(BadModelError) as caught:
        load_model(tiny_model_path, card)
    assert str(caught.value) == message


def test_model_with_free_spatial_dims(tmp_path: Path):
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, None, None, 2))
    outputs = keras.layers.Conv3D(3, 1, activation="softmax")(inputs)
    path = tmp_path / "free.keras"
    keras.Model(inputs, outputs).save(path)

    defaults = load_model(path)
    assert defaults.card.patch_size == (64, 64, 64) and defaults.card.num_classes == 3
    assert defaults.card.input.channels == ("channel 0", "channel 1")

    data = copy.deepcopy(TINY_CARD)
    data["input"].update(channels=["T1", "T2"], patch_size=[8, 16, 24])
    data["classes"] = data["classes"][:3]
    result = load_model(path, card_from_dict(data))
    x = batch(2, channels=2, patch=(8, 16, 24))
    y = result.predict(x)
    assert y.shape == (2, 8, 16, 24, 3)
    np.testing.assert_allclose(y, result.keras_model(x, training=False).numpy(), rtol=0, atol=1e-6)


def test_model_that_is_not_3d(tmp_path: Path):
    import keras

    inputs = keras.Input((16, 16, 1))
    path = tmp_path / "flat.keras"
    keras.Model(inputs, keras.layers.Conv2D(2, 1, activation="softmax")(inputs)).save(path)
    with pytest.raises(BadModelError, match=r"flat.keras takes inputs of shape \[None, 16, 16, 1\]; a 3D"):
        load_model(path)
