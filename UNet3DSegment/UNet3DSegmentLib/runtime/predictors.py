"""The network's forward pass on each Keras backend: a float32 numpy batch in, float32 probabilities out.

A predictor takes channels-last patches ``(n, pz, py, px, c)`` and returns ``(n, pz, py, px, k)``.
Each backend has its fast path, made once per model and reused for every batch:

- TensorFlow: one ``tf.function`` with the fixed signature ``(None, pz, py, px, c)``, traced once
  (``model.predict`` costs ~0.36 s per call and eager calls use up to twice the memory), optionally
  pinned to a device such as ``"/CPU:0"``;
- PyTorch: the model called under ``torch.no_grad``; after a CUDA out-of-memory error the
  allocator's cached blocks are released so that a retry with fewer patches finds the memory free;
- JAX: ``jax.jit`` of the model's stateless call, with batches padded to the largest size seen so
  that it compiles once.

:func:`cpu_copy` makes the CPU twin used by the out-of-memory fallback (``fallback.FallbackPredictor``).
Frameworks are imported inside the functions; nothing here knows about model cards or files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..base.errors import is_out_of_memory

Predictor = Callable[[np.ndarray], np.ndarray]


class TensorflowForward:
    """One ``tf.function`` with signature ``(None, pz, py, px, c)``, optionally pinned to ``device``.

    ``function`` is the ``tf.function`` itself (its tracing count shows it is traced once).
    """

    def __init__(self, model: Any, patch_size: Sequence[int], channels: int, device: Optional[str] = None) -> None:
        import tensorflow as tf

        spec = tf.TensorSpec((None, *patch_size, channels), tf.float32)

        @tf.function(input_signature=[spec])
        def forward(x: Any) -> Any:
            if device is None:
                return tf.cast(model(x, training=False), tf.float32)
            with tf.device(device):
                return tf.cast(model(x, training=False), tf.float32)

        self.function = forward

    def __call__(self, array: np.ndarray) -> np.ndarray:
        return self.function(array).numpy()


def torch_forward(model: Any, on_cpu: bool = False) -> Predictor:
    """The model called without autograd, float32 numpy out; ``on_cpu``: inside ``keras.device("cpu")``.

    After a CUDA out-of-memory error the allocator's cached blocks are released, so that the retry
    with a smaller batch (``fallback.FallbackPredictor``) finds the memory free.
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

    if not on_cpu:
        return forward
    import keras

    def forward_on_cpu(array: np.ndarray) -> np.ndarray:
        with keras.device("cpu"):
            return forward(array)

    return forward_on_cpu


class JaxForward:
    """``jax.jit`` of ``model``'s stateless call; on ``device`` (a ``jax.Device``) when given.

    Batches smaller than the largest seen (``rows``) are padded with zeros to it, so that the jitted
    function compiles for one shape only; the padding rows are dropped from the result.
    """

    def __init__(self, model: Any, device: Any = None) -> None:
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        if device is not None:  # committed arrays make the jitted call run on their device
            trainable, non_trainable = jax.device_put((trainable, non_trainable), device)
        self._weights = (trainable, non_trainable)
        self._device = device
        self._jitted = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=False)[0])
        self.rows = 0  # largest batch seen

    def __call__(self, array: np.ndarray) -> np.ndarray:
        import jax

        n = array.shape[0]
        self.rows = max(self.rows, n)
        if n < self.rows:
            array = np.concatenate([array, np.zeros((self.rows - n,) + array.shape[1:], array.dtype)])
        inputs = array if self._device is None else jax.device_put(array, self._device)
        return np.asarray(self._jitted(*self._weights, inputs), dtype=np.float32)[:n]


def forward_for(backend: str, model: Any, patch_size: Sequence[int], channels: int) -> Predictor:
    """The compiled forward pass of ``model`` on ``backend`` (tensorflow, torch or jax), on its device."""
    if backend == "torch":
        return torch_forward(model)
    if backend == "jax":
        return JaxForward(model)
    return TensorflowForward(model, patch_size, channels)


@dataclass
class CpuCopy:
    """The model's CPU twin for the out-of-memory fallback: its Keras model, forward pass and precision."""

    keras_model: Any
    forward: Predictor
    precision: str  # fp32, bf16 or fp16: what the twin computes in


def cpu_copy(backend: str, model: Any, patch_size: Sequence[int], channels: int, precision: str) -> CpuCopy:
    """The same network running on the CPU, leaving the GPU's memory alone.

    TensorFlow: the twin shares the weights and runs its ``tf.function`` under ``tf.device("/CPU:0")``
    (same precision). PyTorch and JAX: the network is rebuilt on the CPU in float32 (bf16 or fp16 on a
    CPU without bfloat16 kernels would be slower than float32) with the weights copied.
    """
    if backend == "tensorflow":
        return CpuCopy(model, TensorflowForward(model, patch_size, channels, "/CPU:0"), precision)
    import keras

    with keras.device("cpu"):
        twin = float32_copy(model)
    if backend == "torch":
        return CpuCopy(twin, torch_forward(twin, on_cpu=True), "fp32")
    import jax

    return CpuCopy(twin, JaxForward(twin, jax.devices("cpu")[0]), "fp32")


def float32_copy(model: Any) -> Any:
    """A new float32 copy of ``model`` with the same weights (variables made in the device scope in effect)."""
    from .precision import apply_precision

    copy = apply_precision(model, "fp32")
    if copy is model:
        copy = model.__class__.from_config(model.get_config())
        copy.set_weights(model.get_weights())
    return copy
