"""Load a Keras model with its card, check one against the other, and predict patches.

Formats: Keras 3 ``.keras`` (safe mode: no Lambda layers), legacy ``.h5`` (a full model, or weights
only, rebuilt from the card's ``network`` section), and TensorFlow SavedModel folders (only pure tensor
operations, checked by ``savedmodel_safety`` before TensorFlow loads them, unless trusted). A
:class:`LoadedModel` predicts through its backend's compiled forward pass (``runtime.predictors``).

The framework is set up by ``runtime.backends.configure_runtime`` before the first op (threading and
visible GPUs cannot change afterwards); :func:`load_model` configures the defaults when nobody did.
Frameworks are imported inside the functions that need them.

Axis order: batches are channels-last ``(n, z, y, x, channels)``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from ..base.errors import BadInputError, BadModelError, OutOfMemoryError, is_out_of_memory
from ..base.options import BACKENDS, SegmentOptions
from ..runtime.backends import ensure_configured
from ..runtime.precision import apply_precision, resolve_precision
from ..runtime.predictors import Predictor, cpu_copy, forward_for
from .card import SEED_ARCHITECTURE, ModelCard, card_for_model, card_path_for_model, default_card

logger = logging.getLogger(__name__)

KERAS_SUFFIXES = (".keras",)
H5_SUFFIXES = (".h5", ".hdf5")
DEFAULT_PATCH_SIDE = 64  # for models whose spatial input dims are free and that come without a card
_trusted = False  # set by trust_models(): the command line's --trust-model


def trust_models(enabled: bool) -> None:
    """Whether :func:`load_model` skips the SavedModel safety check by default (``--trust-model``).

    Only the command line sets it, from ``SegmentOptions.trust_model``; the web page never does.
    """
    global _trusted
    _trusted = bool(enabled)


@dataclass
class LoadedModel:
    """A Keras model with its validated card, and a fast batch predictor.

    ``predict`` (also ``__call__``, so the object is a predictor for the sliding window) takes a
    float32 batch ``(n, pz, py, px, c)`` and returns float32 probabilities ``(n, pz, py, px, k)``.
    """

    keras_model: Any
    card: ModelCard
    path: Path
    card_path: Optional[Path] = None  # the card file used; None when the card was given or defaulted
    uses_default_card: bool = False
    precision: str = "fp32"  # the concrete precision the model computes in: fp32, bf16 or fp16
    device: str = "cpu"  # where it runs: "cpu" or "gpu:N"
    _function: Optional[Predictor] = field(default=None, init=False, repr=False)  # runtime.predictors

    @property
    def patch_size(self) -> Tuple[int, int, int]:
        return self.card.patch_size

    @property
    def backend(self) -> str:
        """The Keras backend the model runs on: tensorflow, torch or jax."""
        import keras

        return str(keras.backend.backend())

    @property
    def in_channels(self) -> int:
        return self.card.in_channels

    @property
    def num_classes(self) -> int:
        return self.card.num_classes

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run the network on one batch of patches (no training-mode layers, no retracing)."""
        array = np.asarray(batch, dtype=np.float32)
        expected = (*self.patch_size, self.in_channels)
        if array.ndim != 5 or array.shape[1:] != expected:
            raise BadInputError(
                f"a batch for {self.path.name} must have shape (n, {', '.join(map(str, expected))}) "
                f"(n, z, y, x, channels), got {array.shape}"
            )
        try:
            return self._forward()(array)
        except Exception as error:  # noqa: BLE001 - each backend has its own out-of-memory type
            if not is_out_of_memory(error):
                raise
            raise OutOfMemoryError(
                f"out of memory predicting a batch of {array.shape[0]} patch(es) of "
                f"{'x'.join(map(str, self.patch_size))} on {self.device}; lower the batch size or the "
                "patch size, or use the CPU"
            ) from error

    __call__ = predict

    def _forward(self) -> Predictor:
        """The backend's compiled forward pass (``runtime.predictors.forward_for``), made on first use."""
        if self._function is None:
            self._function = forward_for(self.backend, self.keras_model, self.patch_size, self.in_channels)
        return self._function

    def cpu_predictor(self) -> Optional["LoadedModel"]:
        """The same model running on the CPU (for the GPU out-of-memory fallback), or None on the CPU.

        See ``runtime.predictors.cpu_copy``: on TensorFlow the copy shares the weights; on PyTorch and
        JAX it is a float32 rebuild on the CPU, so the GPU's memory is left alone.
        """
        if self.device == "cpu":
            return None
        copy = cpu_copy(self.backend, self.keras_model, self.patch_size, self.in_channels, self.precision)
        twin = LoadedModel(copy.keras_model, self.card, self.path, self.card_path, self.uses_default_card,
                           copy.precision, "cpu")
        twin._function = copy.forward
        return twin


def load_model(
    path: Union[str, Path], card: Optional[ModelCard] = None, precision: str = "fp32",
    trust: Optional[bool] = None,
) -> LoadedModel:
    """Load ``.keras``, ``.h5`` or a SavedModel folder, with its card, and check they agree.

    Without ``card``: the card beside the model (``card_for_model``), else seed defaults shaped after
    the model's own input and output. Any unusable file or card-model contradiction raises
    ``BadModelError`` saying what to fix. ``precision`` (``fp32``, ``bf16``, ``fp16`` or ``auto``, see
    ``runtime/precision.py``) rebuilds the model under that mixed-precision policy, output layer float32.
    Runs on the Keras backend in effect (``runtime.backends.select_backend``) and the device configured
    (``runtime.backends.configure_runtime``, defaults if not called); SavedModels need TensorFlow.
    A SavedModel must pass ``savedmodel_safety.check_saved_model`` before anything of it is loaded, unless
    ``trust`` (default: :func:`trust_models`, the command line's ``--trust-model``) is true.
    """
    path = Path(path)
    kind = _model_kind(path)
    card_path = None
    if card is None:
        card = card_for_model(path)
        card_path = card_path_for_model(path) if card is not None else None
    precision = SegmentOptions.spec("precision").check(precision)
    device = ensure_configured()
    _check_backend(kind, path)
    if kind == "saved_model" and not (_trusted if trust is None else trust):
        from .savedmodel_safety import check_saved_model

        check_saved_model(path)  # reads saved_model.pb only; refuses any op beyond pure tensor maths

    if kind == "keras":
        model = _load_keras(path)
    elif kind == "h5":
        model, card = _load_h5(path, card)
    else:
        model = _load_saved_model(path)

    input_shape, output_shape = _io_shapes(model, path)
    uses_default = card is None
    if card is None:
        card = _card_from_shapes(input_shape, output_shape, path)
    check_card_matches_model(card, input_shape, output_shape, path.name)
    concrete = resolve_precision(precision, device)
    model = apply_precision(model, concrete)
    return LoadedModel(model, card, path, card_path=card_path, uses_default_card=uses_default,
                       precision=concrete, device=device)


def _model_kind(path: Path) -> str:
    if not path.exists():
        raise BadModelError(f"model {path} not found; check the path")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "saved_model"
        raise BadModelError(
            f"folder {path} is not a TensorFlow SavedModel (no saved_model.pb); "
            "pass a .keras or .h5 file or a SavedModel folder"
        )
    suffix = path.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix in H5_SUFFIXES:
        return "h5"
    raise BadModelError(
        f"model {path.name} has an unknown format {suffix or '(no extension)'!r}; "
        "use a Keras .keras file, a legacy .h5 file or a TensorFlow SavedModel folder"
    )


def _check_backend(kind: str, path: Path) -> None:
    """SavedModel folders are TensorFlow graphs: refuse them on the other Keras backends."""
    import keras

    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise BadInputError(
            f"Keras runs on the {backend} backend; use {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]} "
            "(set KERAS_BACKEND)"
        )
    if kind == "saved_model" and backend != "tensorflow":
        raise BadModelError(
            f"{path.name} is a TensorFlow SavedModel, which only the tensorflow backend can run; use "
            "--backend tensorflow, or save the model as a .keras file"
        )


def _load_keras(path: Path) -> Any:
    import keras

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises ValueError, TypeError, zipfile/OSError... for bad files
        raise _load_error(path, error) from error


def _load_error(path: Path, error: Exception) -> BadModelError:
    """Turn a Keras loading failure into a one-line ``BadModelError`` with the fix."""
    text = " ".join(str(error).split())
    if "Lambda" in text and "safe_mode" in text:
        return BadModelError(
            f"model {path.name} contains a Lambda layer (arbitrary Python code), which is refused for "
            "safety; rebuild the model without Lambda layers and save it again"
        )
    if "Could not locate" in text or "Unknown layer" in text:
        return BadModelError(
            f"model {path.name} uses a layer or function this engine does not know ({text[:200]}); "
            "save the model with standard Keras layers only"
        )
    return BadModelError(
        f"model {path.name} cannot be read ({type(error).__name__}: {text[:200]}); "
        "check the file is complete, or save the model again with model.save('name.keras')"
    )


def _load_h5(path: Path, card: Optional[ModelCard]) -> Tuple[Any, Optional[ModelCard]]:
    """A full legacy model, or weights only rebuilt on the seed architecture from the card."""
    import h5py
    import keras

    try:
        with h5py.File(path, "r") as handle:
            has_config = "model_config" in handle.attrs
    except OSError as error:
        raise BadModelError(
            f"model {path.name} is not a readable HDF5 file ({error}); check the file is complete"
        ) from error
    if has_config:
        try:
            return keras.saving.load_model(path, compile=False, safe_mode=True), card
        except Exception as error:
            raise _load_error(path, error) from error

    weights_card = card if card is not None else default_card()
    network = weights_card.network
    if network.architecture != SEED_ARCHITECTURE:
        raise BadModelError(
            f"{path.name} holds weights only and its card's network.architecture is "
            f"{network.architecture!r}; only {SEED_ARCHITECTURE!r} can be rebuilt: "
            "save the full model instead"
        )
    from .network import build_unet3d

    described = (
        f"base_filters={network.base_filters}, {weights_card.in_channels} input channel(s), "
        f"{weights_card.num_classes} classes"
    )
    model = build_unet3d(
        patch_size=weights_card.patch_size,
        in_channels=weights_card.in_channels,
        num_classes=weights_card.num_classes,
        base_filters=network.base_filters,
        dropout_rate=network.dropout_rate,
    )
    try:
        with warnings.catch_warnings():
            # Keras 3 warns about its own bookkeeping containers that weights files never hold.
            warnings.filterwarnings("ignore", message="Skipping nested container", category=UserWarning)
            model.load_weights(path)
    except Exception as error:
        text = " ".join(str(error).split())[:200]
        fix = "fix the card's network, input.channels and classes" if card else "write a model card beside it"
        raise BadModelError(
            f"weights in {path.name} do not fit the seed network with {described} ({text}); "
            f"{fix} so they match the weights"
        ) from error
    return model, card


def _load_saved_model(path: Path) -> Any:
    """Wrap a SavedModel's ``serving_default`` signature in a one-input, one-output Keras model."""
    import keras

    try:
        layer = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
    except Exception as error:
        text = " ".join(str(error).split())[:200]
        raise BadModelError(
            f"SavedModel {path.name} cannot be loaded ({type(error).__name__}: {text}); export it with "
            "model.export(folder) so it has a serving_default signature"
        ) from error
    arguments, keywords = layer.call_endpoint_fn.structured_input_signature
    specs = list(arguments) + list(keywords.values())
    outputs = layer.call_endpoint_fn.structured_outputs
    output_names = list(outputs) if isinstance(outputs, dict) else [None]
    if len(specs) != 1 or len(output_names) != 1:
        raise BadModelError(
            f"SavedModel {path.name} has {len(specs)} input(s) and {len(output_names)} output(s); "
            "the engine needs exactly one of each"
        )
    inputs = keras.Input(shape=tuple(specs[0].shape[1:]), name="input")
    result = layer(inputs)
    if isinstance(result, dict):
        result = result[output_names[0]]
    return keras.Model(inputs, result, name=path.name)


def _io_shapes(model: Any, path: Path) -> Tuple[tuple, tuple]:
    """The model's single input and output shapes, checked to be 5-D channels-last."""
    try:
        inputs, outputs = list(model.inputs), list(model.outputs)
    except (AttributeError, ValueError) as error:
        raise BadModelError(
            f"model {path.name} has no defined input shape; save a functional or built Sequential model"
        ) from error
    if len(inputs) != 1 or len(outputs) != 1:
        raise BadModelError(
            f"model {path.name} has {len(inputs)} input(s) and {len(outputs)} output(s); "
            "the engine needs exactly one of each"
        )
    input_shape, output_shape = tuple(inputs[0].shape), tuple(outputs[0].shape)
    for role, shape in (("takes inputs", input_shape), ("outputs", output_shape)):
        if len(shape) != 5 or shape[-1] is None:
            raise BadModelError(
                f"model {path.name} {role} of shape {_shape(shape)}; a 3D segmentation model works on "
                "(batch, z, y, x, channels) with a known number of channels"
            )
    for axis in range(1, 4):
        if None not in (input_shape[axis], output_shape[axis]) and input_shape[axis] != output_shape[axis]:
            raise BadModelError(
                f"model {path.name} outputs {_shape(output_shape[1:4])} for inputs of "
                f"{_shape(input_shape[1:4])} (z, y, x); the engine needs outputs the size of the input "
                "patch ('same' padding)"
            )
    return input_shape, output_shape


def _card_from_shapes(input_shape: tuple, output_shape: tuple, path: Path) -> ModelCard:
    """Seed defaults shaped after the model: its channels, classes and fixed patch size."""
    spatial = [DEFAULT_PATCH_SIDE if side is None else int(side) for side in input_shape[1:4]]
    if output_shape[-1] < 2:
        raise BadModelError(
            f"model {path.name} outputs {output_shape[-1]} channel; the engine needs one softmax channel "
            "per class, background included (at least 2)"
        )
    if any(side % 8 for side in spatial):
        raise BadModelError(
            f"model {path.name} takes fixed patches of {spatial} (z, y, x); the engine needs multiples of 8"
        )
    return default_card(
        num_classes=int(output_shape[-1]), in_channels=int(input_shape[-1]), patch_size=tuple(spatial)
    )


def check_card_matches_model(
    card: ModelCard, input_shape: tuple, output_shape: tuple, model_name: str
) -> None:
    """Raise ``BadModelError`` when the card contradicts the model's channels, classes or patch size."""
    if card.in_channels != input_shape[-1]:
        raise BadModelError(
            f"model card says {card.in_channels} input channel(s) but {model_name} takes {input_shape[-1]}; "
            "fix the card's input.channels list"
        )
    if card.num_classes != output_shape[-1]:
        raise BadModelError(
            f"model card says {card.num_classes} classes but {model_name} outputs {output_shape[-1]} "
            "channels; fix the card's classes list"
        )
    fixed = input_shape[1:4]
    if any(side is not None and side != mine for side, mine in zip(fixed, card.patch_size)):
        raise BadModelError(
            f"model card says patch_size {list(card.patch_size)} but {model_name} takes patches of "
            f"{_shape(fixed)} (z, y, x); set input.patch_size to match"
        )


def _shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("None" if s is None else str(s) for s in shape) + "]"
