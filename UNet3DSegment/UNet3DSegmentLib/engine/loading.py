"""Load a Keras model with its card, check one against the other, and predict patches fast.

Formats: Keras 3 ``.keras`` (safe mode: no Lambda layers), legacy ``.h5`` (a full model, or weights
only, rebuilt from the card's ``network`` section), and TensorFlow SavedModel folders. The predictor
runs one ``tf.function`` with a fixed input signature: ``model.predict`` costs ~0.36 s per call and
eager calls use up to twice the memory.

TensorFlow is imported inside the functions that need it. ``configure_tensorflow`` must run before the
first TensorFlow op: threading and visible GPUs cannot change afterwards.

Axis order: batches are channels-last ``(n, z, y, x, channels)``.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from ..base.errors import BadInputError, BadModelError, OutOfMemoryError, is_out_of_memory
from .card import SEED_ARCHITECTURE, ModelCard, card_for_model, card_path_for_model, default_card

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
KERAS_SUFFIXES = (".keras",)
H5_SUFFIXES = (".h5", ".hdf5")
DEFAULT_PATCH_SIDE = 64  # for models whose spatial input dims are free and that come without a card

_configured: dict = {}  # the last successful request and the device it gave


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask in containers, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_tensorflow(
    device: str = "auto",
    threads: Optional[int] = None,
    gpu_index: Optional[int] = None,
    gpu_memory_limit: Optional[int] = None,
) -> str:
    """Set TensorFlow's threads and visible GPU before any op runs; return the device used.

    Intra-op threads = ``threads`` (default: all cores) and inter-op threads = 1: TensorFlow's default
    thread pools gave random 2x slowdowns on 2 cores. ``device``: ``"cpu"`` hides every GPU, ``"gpu"``
    needs one (``BadInputError`` otherwise), ``"auto"`` takes a GPU when one is visible. ``gpu_index``
    picks among several GPUs; ``gpu_memory_limit`` (bytes) caps the memory TensorFlow takes on it
    (otherwise it grows as needed). Returns ``"cpu"`` or ``"gpu:N"``. Calling again with the same request is
    free; once TensorFlow has started, a different request cannot be applied: it is logged and the
    device in effect is returned.
    """
    if device not in DEVICES:
        raise BadInputError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if threads is not None and not (_is_int(threads) and threads >= 1):
        raise BadInputError(f"threads must be a positive integer, got {threads!r}")
    if gpu_index is not None and not (_is_int(gpu_index) and gpu_index >= 0):
        raise BadInputError(f"GPU index must be an integer >= 0, got {gpu_index!r}")
    if gpu_memory_limit is not None and not (_is_int(gpu_memory_limit) and gpu_memory_limit >= 2**20):
        raise BadInputError(f"GPU memory limit must be at least 1 MiB, got {gpu_memory_limit!r} bytes")
    request = (device, threads or cpu_cores(), gpu_index, gpu_memory_limit)
    if _configured.get("request") == request:
        return _configured["device"]

    from ..runtime.tensorflow_setup import import_tensorflow_quietly

    tf = import_tensorflow_quietly()  # keeps TensorFlow's native start-up lines off stderr

    gpus = tf.config.list_physical_devices("GPU")  # does not start TensorFlow's runtime
    chosen = None
    if device != "cpu" and gpus:
        index = 0 if gpu_index is None else gpu_index
        if index >= len(gpus):
            raise BadInputError(
                f"GPU index {index} does not exist: TensorFlow sees {len(gpus)} GPU(s) (0 to {len(gpus) - 1})"
            )
        chosen = index
    elif device == "gpu":
        raise BadInputError(
            "device gpu was requested but TensorFlow sees no GPU (CPU-only TensorFlow build, missing CUDA "
            "libraries or driver); use device cpu or auto, or install a GPU build of TensorFlow"
        )
    try:
        tf.config.threading.set_intra_op_parallelism_threads(request[1])
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.set_visible_devices([] if chosen is None else [gpus[chosen]], "GPU")
        if chosen is not None and gpu_memory_limit is not None:
            limit = tf.config.LogicalDeviceConfiguration(memory_limit=gpu_memory_limit // 2**20)  # MiB
            tf.config.set_logical_device_configuration(gpus[chosen], [limit])
        elif chosen is not None:
            tf.config.experimental.set_memory_growth(gpus[chosen], True)
    except RuntimeError as error:  # TensorFlow already started: settings are fixed for this process
        in_effect = _device_in_effect(tf, gpus)
        logger.warning(
            "TensorFlow was already running, so device=%s threads=%s could not be applied (%s); using %s",
            device, request[1], error, in_effect,
        )
        _configured.update(request=request, device=in_effect)  # warn once per request
        return in_effect
    result = "cpu" if chosen is None else f"gpu:{chosen}"
    _configured.update(request=request, device=result)
    return result


def _device_in_effect(tf: Any, gpus: Sequence[Any]) -> str:
    visible = tf.config.get_visible_devices("GPU")
    if not visible:
        return "cpu"
    return f"gpu:{gpus.index(visible[0]) if visible[0] in gpus else 0}"


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
    _function: Any = field(default=None, init=False, repr=False)
    _rows: int = field(default=0, init=False, repr=False)  # largest batch seen (JAX pads to it)

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
            return self._compiled()(array)
        except Exception as error:  # noqa: BLE001 - each backend has its own out-of-memory type
            if not is_out_of_memory(error):
                raise
            raise OutOfMemoryError(
                f"out of memory predicting a batch of {array.shape[0]} patch(es) of "
                f"{'x'.join(map(str, self.patch_size))} on {self.device}; lower the batch size or the "
                "patch size, or use the CPU"
            ) from error

    __call__ = predict

    def _compiled(self) -> Any:
        """The backend's compiled forward pass (numpy in, float32 numpy out), made on first use.

        TensorFlow: one ``tf.function`` with signature ``(None, pz, py, px, c)`` (traced once).
        PyTorch: the model called under ``torch.no_grad``. JAX: ``jax.jit`` of a stateless call, with
        batches padded to the largest size seen so that it compiles once.
        """
        if self._function is None:
            backend = self.backend
            if backend == "torch":
                self._function = _torch_forward(self.keras_model)
            elif backend == "jax":
                self._function = self._jax_forward(self.keras_model)
            else:
                self._function = _tensorflow_function(self.keras_model, self.patch_size, self.in_channels)
        if self.backend == "tensorflow":
            function = self._function
            return lambda array: function(array).numpy()
        return self._function

    def _jax_forward(self, model: Any, device: Any = None) -> Any:
        """``jax.jit`` of ``model``'s stateless call; on ``device`` (a jax.Device) when given."""
        import jax
        import numpy as numpy_

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        if device is not None:  # committed arrays make the jitted call run on their device
            trainable, non_trainable = jax.device_put((trainable, non_trainable), device)
        jitted = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=False)[0])

        def forward(array: np.ndarray) -> np.ndarray:
            n = array.shape[0]
            self._rows = max(self._rows, n)
            if n < self._rows:
                array = numpy_.concatenate([array, numpy_.zeros((self._rows - n,) + array.shape[1:], array.dtype)])
            inputs = array if device is None else jax.device_put(array, device)
            return numpy_.asarray(jitted(trainable, non_trainable, inputs), dtype=numpy_.float32)[:n]

        return forward

    def cpu_predictor(self) -> Optional["LoadedModel"]:
        """The same model running on the CPU (for the GPU out-of-memory fallback), or None on the CPU.

        TensorFlow: the copy shares the weights and runs its ``tf.function`` under
        ``tf.device("/CPU:0")``. PyTorch and JAX: the network is rebuilt on the CPU in float32 (bf16
        or fp16 on a CPU without bfloat16 kernels would be slower than float32) with the weights copied,
        so the GPU's memory is left alone.
        """
        if self.device == "cpu":
            return None
        backend = self.backend
        twin = LoadedModel(self.keras_model, self.card, self.path, self.card_path, self.uses_default_card,
                           self.precision, "cpu")
        if backend == "tensorflow":
            twin._function = _tensorflow_function(self.keras_model, self.patch_size, self.in_channels, "/CPU:0")
            return twin
        import keras

        with keras.device("cpu"):
            twin.keras_model = _float32_copy(self.keras_model)
        twin.precision = "fp32"
        if backend == "torch":
            forward = _torch_forward(twin.keras_model)

            def on_cpu(array: np.ndarray) -> np.ndarray:
                with keras.device("cpu"):
                    return forward(array)

            twin._function = on_cpu
        else:
            import jax

            twin._function = twin._jax_forward(twin.keras_model, jax.devices("cpu")[0])
        return twin


def _float32_copy(model: Any) -> Any:
    """A new float32 copy of ``model`` with the same weights (variables made in the device scope in effect)."""
    from ..runtime.precision import apply_precision

    copy = apply_precision(model, "fp32")
    if copy is model:
        copy = model.__class__.from_config(model.get_config())
        copy.set_weights(model.get_weights())
    return copy


def _tensorflow_function(model: Any, patch_size: Sequence[int], channels: int, device: Optional[str] = None) -> Any:
    """One ``tf.function`` with signature ``(None, pz, py, px, c)``, optionally pinned to ``device``."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *patch_size, channels), tf.float32)

    @tf.function(input_signature=[spec])
    def forward(x: Any) -> Any:
        if device is None:
            return tf.cast(model(x, training=False), tf.float32)
        with tf.device(device):
            return tf.cast(model(x, training=False), tf.float32)

    return forward


def _torch_forward(model: Any) -> Any:
    """The model called without autograd; returns float32 numpy.

    After a CUDA out-of-memory error the allocator's cached blocks are released, so that the retry
    with a smaller batch (``devices.FallbackPredictor``) finds the memory free.
    """
    import torch

    def forward(array: np.ndarray) -> np.ndarray:
        try:
            with torch.no_grad():
                result = model(torch.from_numpy(array), training=False)
                return result.detach().to(dtype=torch.float32, device="cpu").numpy()
        except Exception as error:  # noqa: BLE001 - torch.OutOfMemoryError, or RuntimeError on old versions
            if is_out_of_memory(error) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise

    return forward


def load_model(
    path: Union[str, Path], card: Optional[ModelCard] = None, precision: str = "fp32"
) -> LoadedModel:
    """Load ``.keras``, ``.h5`` or a SavedModel folder, with its card, and check they agree.

    Without ``card``: the card beside the model (``card_for_model``), else seed defaults shaped after
    the model's own input and output. Any unusable file or card-model contradiction raises
    ``BadModelError`` saying what to fix. ``precision`` (``fp32``, ``bf16``, ``fp16`` or ``auto``, see
    ``precision.py``) rebuilds the model under that mixed-precision policy, output layer float32.
    Runs on the Keras backend in effect (``backends.select_backend``); SavedModels need TensorFlow.
    """
    path = Path(path)
    kind = _model_kind(path)
    card_path = None
    if card is None:
        card = card_for_model(path)
        card_path = card_path_for_model(path) if card is not None else None
    from ..runtime.precision import apply_precision, resolve_precision, validate_precision

    validate_precision(precision)
    device = _ensure_configured()
    _check_backend(kind, path)

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


def configure_runtime(
    device: str = "auto",
    threads: Optional[int] = None,
    gpu_index: Optional[int] = None,
    gpu_memory_limit: Optional[int] = None,
) -> str:
    """Configure the framework of the Keras backend chosen by ``KERAS_BACKEND``; return its device.

    TensorFlow: :func:`configure_tensorflow`. PyTorch: CPU threads, cuDNN autotuning and the memory
    cap (the GPU was chosen by ``backends.select_backend``). JAX: the device it found.
    ``gpu_memory_limit``: bytes this process may take on the GPU (TensorFlow and PyTorch).
    Returns ``"cpu"`` or ``"gpu:N"``.
    """
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if gpu_memory_limit is not None and not (_is_int(gpu_memory_limit) and gpu_memory_limit >= 2**20):
        raise BadInputError(f"GPU memory limit must be at least 1 MiB, got {gpu_memory_limit!r} bytes")
    if backend == "torch":
        from ..runtime.backends import configure_torch

        _configured["backend_device"] = configure_torch(device, threads, gpu_memory_limit)
        return _configured["backend_device"]
    if backend == "jax":
        from ..runtime.backends import configure_jax

        if gpu_memory_limit is not None:
            raise BadInputError("a GPU memory limit is not available on the jax backend; set "
                                "XLA_PYTHON_CLIENT_MEM_FRACTION instead, or use the tensorflow or torch backend")

        _configured["backend_device"] = configure_jax(device)
        return _configured["backend_device"]
    return configure_tensorflow(device, threads, gpu_index, gpu_memory_limit)


def _ensure_configured() -> str:
    """The device in effect, configuring the backend's defaults (all cores, auto device) if needed."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") in ("torch", "jax"):
        return _configured.get("backend_device") or configure_runtime()
    if not _configured.get("request"):
        return configure_tensorflow()
    return _configured["device"]


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
    if backend not in ("tensorflow", "torch", "jax"):
        raise BadInputError(
            f"Keras runs on the {backend} backend; use tensorflow, torch or jax (set KERAS_BACKEND)"
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("None" if s is None else str(s) for s in shape) + "]"
