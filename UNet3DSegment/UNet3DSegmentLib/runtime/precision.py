"""Precision of the network's arithmetic: ``--precision fp32|bf16|fp16|auto`` and how it is applied.

Mixed precision keeps the weights in float32 and runs the layers in bfloat16 or float16; the layer
that produces the model's output (the softmax) stays float32, and the sliding window always blends
float32 probabilities. On this project's 2-core AVX512-BF16 CPU, ``bf16`` runs the seed network
about 1.9x faster than ``fp32`` (``BENCHMARKS.md``).

A loaded model carries the dtype policy it was saved with, so setting a global policy before loading
is not enough: :func:`apply_precision` rebuilds the model from its config under the policy (output
layers kept float32) and copies the weights. Keras is imported only inside that function.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from ..base.errors import BadInputError
from ..base.options import SegmentOptions, TrainOptions
from .cpu import cpu_has_bf16

logger = logging.getLogger(__name__)

POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
MIN_BF16_PATCH_SIDE = 32  # smaller patches leave 2^3 voxels at the deepest level: see choose_precision


def resolve_precision(
    precision: str, device: str, flags: Optional[frozenset[str]] = None, backend: str = "tensorflow"
) -> str:
    """The concrete precision (``fp32``, ``bf16`` or ``fp16``) for ``precision`` on ``device``.

    ``auto``: on a GPU ``bf16`` (as fast as float16 on recent GPUs, and needs no care with float16's
    small range); on a CPU ``bf16`` when it has AVX512-BF16 or AMX (about 1.9x faster here), else
    ``fp32`` (emulated bfloat16 is slower than float32). ``fp16`` is for GPUs only: TensorFlow has no
    float16 CPU kernel for 3D pooling, so it raises BadInputError on a CPU. ``device`` is ``"cpu"`` or
    ``"gpu[:N]"``.
    """
    precision = SegmentOptions.spec("precision").check(precision)
    on_gpu = str(device).startswith("gpu")
    if precision == "auto":
        if on_gpu:
            return "bf16"
        return "bf16" if cpu_has_bf16(flags) else "fp32"
    if precision == "fp16" and not on_gpu:
        raise BadInputError("fp16 runs on GPUs only (CPUs lack float16 kernels for 3D pooling); use bf16 or fp32")
    if precision == "bf16" and not on_gpu and not cpu_has_bf16(flags):
        logger.warning("this CPU has no bfloat16 instructions (AVX512-BF16/AMX): bf16 will be slow")
    return precision


def policy_name(precision: str) -> str:
    """Keras dtype policy name for a concrete precision (``fp32`` -> ``"float32"``...)."""
    if precision not in POLICIES:
        raise BadInputError(f"precision must be one of {', '.join(POLICIES)}, got {precision!r}")
    return POLICIES[precision]


def model_policy(model: Any) -> str:
    """Name of the dtype policy most layers of ``model`` compute in (the first layer with weights)."""
    for layer in model.layers:
        if layer.weights:
            return str(layer.dtype_policy.name)
    return "float32"


def apply_precision(model: Any, precision: str) -> Any:
    """``model`` computing in ``precision``; the layers whose outputs are the model's outputs stay float32.

    ``fp32`` on a float32 model returns it unchanged. Otherwise the functional model is rebuilt from
    its config with every other layer's ``dtype`` set to the mixed policy, and the weights (float32)
    are copied. Models that cannot be rebuilt (a wrapped SavedModel) are returned unchanged with a
    warning: they run in the precision they were exported in.
    """
    policy = policy_name(precision)
    if model_policy(model) == policy:
        return model
    output_layers = {tensor._keras_history[0].name for tensor in model.outputs if hasattr(tensor, "_keras_history")}
    try:
        config = model.get_config()
        for layer_config in config["layers"]:
            if layer_config["class_name"] in ("InputLayer",):
                continue
            inner = layer_config["config"]
            inner["dtype"] = "float32" if layer_config["config"].get("name") in output_layers else policy
        rebuilt = model.__class__.from_config(config)
        rebuilt.set_weights(model.get_weights())
    except Exception as error:  # noqa: BLE001 - SavedModel wrappers, subclassed models: keep as is
        logger.warning("model %s cannot run in %s (%s); keeping its own precision", model.name, precision, error)
        return model
    return rebuilt


def choose_precision(mode: str, patch_size: Sequence[int] = (64, 64, 64)) -> str:
    """Keras dtype policy for training's ``--mixed-precision auto|on|off``: "mixed_bfloat16" or "float32".

    bfloat16 needs no loss scaling; "auto" uses it on a GPU (any the TF build sees) or on a CPU with
    bfloat16 instructions, where it measured about 1.6x faster per training step on this project's
    2-core AVX512-BF16 machine (seed topology, base 16, 64^3 patch). "auto" keeps float32 for patches
    with a side under ``MIN_BF16_PATCH_SIDE``: with 2^3 voxels at the deepest level and batches of 2 or
    more, TensorFlow 2.21's CPU bfloat16 Conv3D filter gradient came out ~1e17 times too large
    (measured), which turns the weights into NaN within a few steps. ``mode`` is checked as the
    ``mixed_precision`` training option declares.
    """
    mode = TrainOptions.spec("mixed_precision").check(mode)
    if mode == "off":
        return "float32"
    if mode == "on":
        return "mixed_bfloat16"
    if min(int(p) for p in patch_size) < MIN_BF16_PATCH_SIDE:
        return "float32"
    import tensorflow as tf

    return "mixed_bfloat16" if tf.config.list_physical_devices("GPU") or cpu_has_bf16() else "float32"
