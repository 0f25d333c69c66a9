"""A model's input channels and class count, read cheaply from its file: no framework, nothing built or run.

For the Slicer panel and the web page, which show the classes of a model without a card before any
run (and must not load TensorFlow or build a network to do so):

- ``.keras``: the archive's ``config.json``;
- full legacy ``.h5``: the file's ``model_config`` attribute (h5py); weights-only ``.h5`` has none and the
  engine then rebuilds the seed network from the default card, so the default stands;
- SavedModel folder: the ``serving_default`` signature's input and output shapes in ``saved_model.pb``,
  read with a few lines of protobuf wire decoding (no TensorFlow).

Everything here is best effort: an unknown format, an unusual architecture or an unreadable file gives
``None`` for what could not be read, and :func:`default_card_for_model` falls back to the seed defaults.
The engine itself always checks the model it loads (``loading.check_card_matches_model``).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple, Union

from .card import ModelCard, default_card

MAX_CONFIG_BYTES = 64 * 2 ** 20  # a model's architecture description; larger is not a model config
MAX_GRAPH_BYTES = 512 * 2 ** 20  # saved_model.pb (weights live in variables/, not here)
MAX_DEPTH = 64  # layers walked back from the output to the layer that sets the channel count
# Layers whose output has as many channels as their (first) input.
SAME_CHANNELS = frozenset({
    "Activation", "Softmax", "ReLU", "LeakyReLU", "ELU", "PReLU", "ThresholdedReLU", "Dropout", "SpatialDropout3D",
    "SpatialDropout2D", "GaussianDropout", "GaussianNoise", "AlphaDropout", "ActivityRegularization",
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization", "Identity",
    "UpSampling3D", "Cropping3D", "ZeroPadding3D", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum",
    "Rescaling", "InputLayer",
})


@dataclass(frozen=True)
class ModelSummary:
    in_channels: Optional[int] = None
    num_classes: Optional[int] = None


def read_model_summary(path: Union[str, Path]) -> ModelSummary:
    """Input channels and class count of the model at ``path``; ``None`` for what cannot be read cheaply."""
    path = Path(path)
    try:
        if path.is_dir():
            return _saved_model_summary(path / "saved_model.pb")
        suffix = path.suffix.lower()
        if suffix == ".keras":
            return _config_summary(_keras_config(path))
        if suffix in (".h5", ".hdf5"):
            return _config_summary(_h5_config(path))
    except Exception:  # noqa: BLE001 - best effort by design: any surprise means "unknown"
        pass
    return ModelSummary()


def default_card_for_model(path: Union[str, Path]) -> ModelCard:
    """The seed default card shaped after the model's own channels and classes where they can be read."""
    summary = read_model_summary(path)
    classes = summary.num_classes if summary.num_classes and summary.num_classes >= 2 else 4
    channels = summary.in_channels if summary.in_channels and summary.in_channels >= 1 else 1
    return default_card(num_classes=classes, in_channels=channels)


# --- Keras configs (.keras, .h5) ---------------------------------------------------------------------
def _keras_config(path: Path) -> Optional[dict]:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("config.json")
        if info.file_size > MAX_CONFIG_BYTES:
            return None
        return json.loads(archive.read(info))


def _h5_config(path: Path) -> Optional[dict]:
    import h5py

    with h5py.File(path, "r") as handle:
        text = handle.attrs.get("model_config")
    if text is None:
        return None  # weights only: the engine uses the default card's seed network
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return json.loads(text) if len(text) <= MAX_CONFIG_BYTES else None


def _config_summary(config: Optional[dict]) -> ModelSummary:
    if not isinstance(config, dict):
        return ModelSummary()
    body = config.get("config", {})
    layers = body.get("layers") if isinstance(body, dict) else None
    if not isinstance(layers, list) or not layers:
        return ModelSummary()
    by_name = {_layer_name(layer): layer for layer in layers if isinstance(layer, dict)}
    if config.get("class_name") == "Sequential":
        first, last = layers[0], layers[-1]
    else:
        first = by_name.get(_first_name(body.get("input_layers")))
        last = by_name.get(_first_name(body.get("output_layers")))
    return ModelSummary(in_channels=_input_channels(first), num_classes=_output_channels(last, by_name))


def _layer_name(layer: dict) -> Optional[str]:
    return layer.get("name") or (layer.get("config") or {}).get("name")


def _first_name(entries: Any) -> Optional[str]:
    """``["conv_out", 0, 0]`` or ``[["conv_out", 0, 0]]`` -> ``"conv_out"``."""
    while isinstance(entries, list) and entries:
        if isinstance(entries[0], str):
            return entries[0]
        entries = entries[0]
    return None


def _input_channels(layer: Optional[dict]) -> Optional[int]:
    if not isinstance(layer, dict):
        return None
    settings = layer.get("config") or {}
    shape = settings.get("batch_shape") or settings.get("batch_input_shape")
    return _last_dim(shape)


def _output_channels(layer: Optional[dict], by_name: dict) -> Optional[int]:
    for _ in range(MAX_DEPTH):
        if not isinstance(layer, dict):
            return None
        settings = layer.get("config") or {}
        for key in ("filters", "units"):
            if isinstance(settings.get(key), int):
                return settings[key]
        if layer.get("class_name") not in SAME_CHANNELS:
            return None
        shape, source = _inbound(layer)
        if shape is not None:
            return _last_dim(shape)
        layer = by_name.get(source)
    return None


def _inbound(layer: dict) -> Tuple[Optional[list], Optional[str]]:
    """(shape of the first input if recorded (Keras 3), name of the layer it comes from)."""
    nodes = layer.get("inbound_nodes") or []
    if not nodes:
        return None, None
    node = nodes[0]
    if isinstance(node, dict):  # Keras 3: {"args": [{"class_name": "__keras_tensor__", "config": {...}}], ...}
        for argument in _tensors(node.get("args")):
            settings = argument.get("config") or {}
            history = settings.get("keras_history") or [None]
            return settings.get("shape"), history[0]
        return None, None
    return None, _first_name(node)  # legacy: [["layer", 0, 0, {}], ...]


def _tensors(value: Any) -> Iterator[dict]:
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            yield value
    elif isinstance(value, list):
        for item in value:
            yield from _tensors(item)


def _last_dim(shape: Any) -> Optional[int]:
    if isinstance(shape, list) and len(shape) == 5 and isinstance(shape[-1], int) and shape[-1] > 0:
        return shape[-1]
    return None


# --- SavedModel: protobuf wire format, just enough to reach the serving signature's shapes -------------
def _saved_model_summary(path: Path) -> ModelSummary:
    if path.stat().st_size > MAX_GRAPH_BYTES:
        return ModelSummary()
    data = memoryview(path.read_bytes())
    for meta_graph in _fields(data, 2):  # SavedModel.meta_graphs
        for entry in _fields(meta_graph, 5):  # MetaGraphDef.signature_def (map entry: 1 key, 2 value)
            if bytes(next(_fields(entry, 1), b"")) != b"serving_default":
                continue
            signature = next(_fields(entry, 2), memoryview(b""))
            inputs = [_tensor_last_dim(e) for e in _fields(signature, 1)]
            outputs = [_tensor_last_dim(e) for e in _fields(signature, 2)]
            return ModelSummary(in_channels=inputs[0] if len(inputs) == 1 else None,
                                num_classes=outputs[0] if len(outputs) == 1 else None)
    return ModelSummary()


def _tensor_last_dim(entry: memoryview) -> Optional[int]:
    """A ``map<string, TensorInfo>`` entry -> the last dimension of its ``tensor_shape`` (5-D only)."""
    info = next(_fields(entry, 2), memoryview(b""))
    shape = next(_fields(info, 3), memoryview(b""))  # TensorInfo.tensor_shape
    sizes = []
    for dim in _fields(shape, 2):  # TensorShapeProto.dim
        size = next(_fields(dim, 1, varint=True), 0)
        sizes.append(size - (1 << 64) if size >= 1 << 63 else size)  # int64: -1 is "unknown"
    return _last_dim([None if s < 0 else s for s in sizes])


def _fields(data: memoryview, number: int, varint: bool = False) -> Iterator[Any]:
    """Values of field ``number`` in a protobuf message: length-delimited bytes, or varints."""
    index, end = 0, len(data)
    while index < end:
        key, index = _varint(data, index)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, index = _varint(data, index)
            if varint and field == number:
                yield value
        elif wire == 2:
            length, index = _varint(data, index)
            if index + length > end:
                raise ValueError("truncated protobuf")
            if not varint and field == number:
                yield data[index:index + length]
            index += length
        elif wire == 1:
            index += 8
        elif wire == 5:
            index += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _varint(data: memoryview, index: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if index >= len(data) or shift > 63:
            raise ValueError("bad protobuf varint")
        byte = data[index]
        index += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, index
