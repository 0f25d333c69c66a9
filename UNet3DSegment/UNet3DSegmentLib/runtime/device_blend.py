"""Sliding-window blending on the model's own device: the weighted sums never leave it.

On a GPU, copying every batch's softmax output to the host and blending it there with numpy costs
more than the network itself. A :class:`DeviceBlender` keeps the whole (padded) volume's weighted
class sums and weight sums in the backend's arrays instead, next to the model:

- TensorFlow: two ``tf.Variable`` s, added to by one ``tf.function`` per batch (slice reads and
  assigns in a loop over the batch's tiles); the model runs through ``predictors.TensorflowForward``;
- PyTorch: two tensors on the model's device, added to in place under ``torch.no_grad``;
- JAX: two arrays updated by a ``jax.jit`` function that donates them (``donate_argnums``) and adds
  with ``lax.dynamic_update_slice``, so no copy of the volume is made per batch.

Only the answer is copied back: the labelmap (uint8/uint16, ties to the lowest label as on the host),
the per-voxel maximum probability (float16) and, when asked, the probabilities (float32), each worked
out in z chunks so that the device's temporaries stay small. The arithmetic is the host's
(``engine/accumulator.py``): each pass over the test-time flips is summed in float32, multiplied by the
tile weights, added to the sums (in float32, rounded to the ``accumulation`` dtype), and divided by
``weights * passes`` at the end. Frameworks are imported inside the functions.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator, Sequence

import numpy as np

from ..base.errors import BadInputError, OutOfMemoryError, is_out_of_memory

Start = tuple[int, int, int]
Crop = tuple[slice, slice, slice]
CHUNK_VOXELS = 1 << 24  # voxels x classes per chunk when results are worked out and copied back
_FULL: Crop = (slice(None), slice(None), slice(None))


class DeviceBlender:
    """Weighted sums of tile predictions over a whole volume, kept on the model's device.

    Args:
        shape_zyx: the (padded) volume the tiles cover.
        classes: outputs per voxel the model must give.
        weights: the tile importance map, float32 ``(pz, py, px)``.
        accumulation: dtype of the class sums, ``"float32"`` or ``"float16"`` (weights always float32).
        flips: batch-array axes mirrored per test-time pass, the first ``()`` (``stages.flip_sets``).
    """

    def __init__(self, shape_zyx: Sequence[int], classes: int, weights: np.ndarray, accumulation: str = "float32",
                 flips: Sequence[tuple[int, ...]] = ((),)) -> None:
        self.shape = tuple(int(s) for s in shape_zyx)
        self.classes = int(classes)
        self.weights = np.asarray(weights, dtype=np.float32)
        self.patch = tuple(self.weights.shape)
        self.accumulation = accumulation
        self.flips = [tuple(f) for f in flips] or [()]
        self.passes = len(self.flips)
        self.intact = True  # False once an addition failed half-way: the sums are then unusable

    # --- what callers use -----------------------------------------------------------------------
    def add_batch(self, patches: np.ndarray, starts: Sequence[Start]) -> None:
        """Run the model on ``patches`` (float32 ``(n, pz, py, px, c)``) with every flip and add the
        weighted result at ``starts``; nothing is copied back to the host.

        Out of memory in the model (:class:`OutOfMemoryError`) leaves the sums as they were, so the
        batch may be retried in parts; out of memory while adding clears :attr:`intact`.
        """
        array = np.ascontiguousarray(patches, dtype=np.float32)  # owned: the caller may reuse its buffer
        if array.ndim != 5 or array.shape[1:4] != self.patch or array.shape[0] != len(starts):
            raise BadInputError(f"a batch must be (n, {', '.join(map(str, self.patch))}, c) with one start per "
                                f"patch, got {array.shape} for {len(starts)} start(s)")
        summed = _guarded(self._predict, array)
        self.intact = False
        _guarded(self._blend, summed, _starts_array(starts))
        self.intact = True

    def add_background(self, starts: Sequence[Start]) -> None:
        """Add one-hot class 0 (every pass) with the tile weights at ``starts``: tiles skipped as empty."""
        if len(starts):
            self.intact = False
            _guarded(self._add_background, _starts_array(starts))
            self.intact = True

    def labels(self, crop: Crop = _FULL) -> np.ndarray:
        """The labelmap of rows/cols ``crop``: argmax of the averages, lowest label on ties."""
        out = np.empty(_cropped_shape(self.shape, crop), dtype=np.min_scalar_type(self.classes - 1))
        for local, zs in self._chunks(crop):
            out[local] = _guarded(self._labels, zs, crop[1], crop[2])
        return out

    def max_probability(self, crop: Crop = _FULL) -> np.ndarray:
        """Each voxel's largest average probability (its label's), float16: for the confidence figures."""
        out = np.empty(_cropped_shape(self.shape, crop), dtype=np.float16)
        for local, zs in self._chunks(crop):
            out[local] = _guarded(self._max_probability, zs, crop[1], crop[2])
        return out

    def probabilities(self, crop: Crop = _FULL) -> np.ndarray:
        """The blended probabilities of ``crop``, float32 ``(z, y, x, k)`` (a full copy: only when asked)."""
        out = np.empty(_cropped_shape(self.shape, crop) + (self.classes,), dtype=np.float32)
        for local, zs in self._chunks(crop):
            out[local] = _guarded(self._probabilities, zs, crop[1], crop[2])
        return out

    # --- shared helpers ---------------------------------------------------------------------------
    def _check_classes(self, shape: Sequence[Any], patches: tuple) -> None:
        """The model's output must be ``(n, pz, py, px, classes)``."""
        if tuple(int(s) for s in shape[:4]) != patches[:4] or int(shape[4]) != self.classes:
            raise BadInputError(f"the model returned shape {tuple(shape)}, expected ({', '.join(map(str, patches[:4]))}, "
                                f"{self.classes}); it must map patches to per-voxel class outputs of the same size")

    def _chunks(self, crop: Crop) -> Iterator[tuple[slice, slice]]:
        """(rows of the result, rows of the volume) pairs of at most ``CHUNK_VOXELS`` values each."""
        zs = range(*crop[0].indices(self.shape[0]))
        plane = len(range(*crop[1].indices(self.shape[1]))) * len(range(*crop[2].indices(self.shape[2])))
        step = max(1, CHUNK_VOXELS // max(1, plane * self.classes))
        for first in range(0, len(zs), step):
            last = min(first + step, len(zs))
            yield slice(first, last), slice(zs[first], zs[last - 1] + 1)

    # --- per backend --------------------------------------------------------------------------------
    def _predict(self, patches: np.ndarray) -> Any:
        """The model's outputs summed over the flips, a device array ``(n or more, pz, py, px, k)``."""
        raise NotImplementedError

    def _blend(self, predictions: Any, starts: np.ndarray) -> None:
        """Add ``predictions[i] * weights`` at ``starts[i]`` to the sums, and the weights to theirs."""
        raise NotImplementedError

    def _add_background(self, starts: np.ndarray) -> None:
        raise NotImplementedError

    def _labels(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        raise NotImplementedError

    def _max_probability(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        raise NotImplementedError

    def _probabilities(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        raise NotImplementedError


def _guarded(step: Any, *arguments: Any) -> Any:
    """``step(*arguments)``; an out-of-memory error of any framework becomes :class:`OutOfMemoryError`
    (which the pipeline answers by blending on the host)."""
    try:
        return step(*arguments)
    except BadInputError:
        raise
    except Exception as error:  # noqa: BLE001 - every framework has its own out-of-memory type
        if not is_out_of_memory(error):
            raise
        raise OutOfMemoryError(f"out of memory blending on the device ({type(error).__name__})") from error


def _starts_array(starts: Sequence[Start]) -> np.ndarray:
    return np.asarray(starts, dtype=np.int32).reshape(-1, 3)


def _cropped_shape(shape: tuple, crop: Crop) -> tuple[int, int, int]:
    return tuple(len(range(*c.indices(s))) for c, s in zip(crop, shape))  # type: ignore[return-value]


def device_blender(backend: str, model: Any, shape_zyx: Sequence[int], classes: int, weights: np.ndarray,
                   accumulation: str = "float32", flips: Sequence[tuple[int, ...]] = ((),)) -> DeviceBlender:
    """The :class:`DeviceBlender` of ``backend`` (tensorflow, torch or jax) for the Keras ``model``."""
    kinds = {"tensorflow": TensorflowBlender, "torch": TorchBlender, "jax": JaxBlender}
    if backend not in kinds:
        raise BadInputError(f"blending on the device needs the tensorflow, torch or jax backend, got {backend!r}")
    return _guarded(kinds[backend], model, shape_zyx, classes, weights, accumulation, flips)


# ---------------------------------------------------------------------------------------------------
# TensorFlow
# ---------------------------------------------------------------------------------------------------
_TF_FORWARDS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _tensorflow_forward(model: Any, patch: tuple, channels: int) -> Any:
    """The model's ``tf.function`` (``predictors.TensorflowForward``), made once per model and patch shape."""
    from .predictors import TensorflowForward

    made = _TF_FORWARDS.setdefault(model, {})
    key = (patch, channels)
    if key not in made:
        made[key] = TensorflowForward(model, patch, channels).function
    return made[key]


class TensorflowBlender(DeviceBlender):
    """Sums in ``tf.Variable`` s where TensorFlow places them (the GPU when it has one)."""

    def __init__(self, model: Any, *arguments: Any) -> None:
        super().__init__(*arguments)
        import tensorflow as tf

        self._tf, self._model = tf, model
        self._dtype = tf.as_dtype(self.accumulation)
        self._sums = tf.Variable(tf.zeros(self.shape + (self.classes,), self._dtype), trainable=False)
        self._weight_sums = tf.Variable(tf.zeros(self.shape, tf.float32), trainable=False)
        self._tile_weights = tf.constant(self.weights)
        spec = [tf.TensorSpec((None,) + self.patch + (self.classes,), tf.float32), tf.TensorSpec((None, 3), tf.int32)]
        self._blend_function = tf.function(self._blend_python, input_signature=spec)

    def _blend_python(self, predictions: Any, starts: Any) -> None:
        """Add each tile's ``prediction * weights`` (float32, then rounded to the sums' dtype)."""
        tf = self._tf
        pz, py, px = self.patch
        weights = self._tile_weights
        per_class = weights[..., tf.newaxis]
        for i in tf.range(tf.shape(starts)[0]):
            z, y, x = starts[i, 0], starts[i, 1], starts[i, 2]
            region = self._sums[z:z + pz, y:y + py, x:x + px]
            term = predictions[i] * per_class
            self._sums[z:z + pz, y:y + py, x:x + px].assign(tf.cast(tf.cast(region, tf.float32) + term, self._dtype))
            self._weight_sums[z:z + pz, y:y + py, x:x + px].assign(
                self._weight_sums[z:z + pz, y:y + py, x:x + px] + weights)

    def _predict(self, patches: np.ndarray) -> Any:
        tf = self._tf
        forward = _tensorflow_forward(self._model, self.patch, patches.shape[4])
        batch = tf.constant(patches)
        summed = None
        for flip in self.flips:
            if flip:
                output = tf.reverse(forward(tf.reverse(batch, flip)), flip)
            else:
                output = forward(batch)
            if summed is None:
                self._check_classes(output.shape, patches.shape)
            summed = output if summed is None else summed + output
        return summed

    def _blend(self, predictions: Any, starts: np.ndarray) -> None:
        self._blend_function(predictions, self._tf.constant(starts))

    def _add_background(self, starts: np.ndarray) -> None:
        tf = self._tf
        labels = tf.zeros((len(starts),) + self.patch, tf.int32)
        self._blend(tf.one_hot(labels, self.classes, on_value=float(self.passes), off_value=0.0), starts)

    def _averages(self, zs: slice, ys: slice, xs: slice) -> Any:
        tf = self._tf
        sums = tf.cast(self._sums[zs, ys, xs], tf.float32)
        weights = self._weight_sums[zs, ys, xs]
        if self.passes != 1:
            weights = weights * float(self.passes)
        return sums / weights[..., tf.newaxis]

    def _labels(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        tf = self._tf
        averages = self._averages(zs, ys, xs)
        top = tf.reduce_max(averages, axis=-1, keepdims=True)
        index = tf.where(averages == top, tf.range(self.classes), self.classes)  # lowest label on ties
        return tf.reduce_min(index, axis=-1).numpy()

    def _max_probability(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        tf = self._tf
        return tf.cast(tf.reduce_max(self._averages(zs, ys, xs), axis=-1), tf.float16).numpy()

    def _probabilities(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        return self._averages(zs, ys, xs).numpy()


# ---------------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------------
class TorchBlender(DeviceBlender):
    """Sums in torch tensors on the model's device, added to in place."""

    def __init__(self, model: Any, *arguments: Any) -> None:
        super().__init__(*arguments)
        import torch

        self._torch, self._model = torch, model
        self._device = _torch_device(model)
        self._dtype = getattr(torch, self.accumulation)
        self._sums = torch.zeros(self.shape + (self.classes,), dtype=self._dtype, device=self._device)
        self._weight_sums = torch.zeros(self.shape, dtype=torch.float32, device=self._device)
        self._tile_weights = torch.from_numpy(self.weights.copy()).to(self._device)

    def _blend(self, predictions: Any, starts: np.ndarray) -> None:
        with self._torch.no_grad():
            self._add_tiles(predictions, starts)

    def _add_tiles(self, predictions: Any, starts: np.ndarray) -> None:
        pz, py, px = self.patch
        per_class = self._tile_weights[..., None]
        for i, (z, y, x) in enumerate(starts.tolist()):
            region = self._sums[z:z + pz, y:y + py, x:x + px]
            region.copy_(region.float() + predictions[i] * per_class)
            self._weight_sums[z:z + pz, y:y + py, x:x + px] += self._tile_weights

    def _predict(self, patches: np.ndarray) -> Any:
        try:
            return self._predict_flips(patches)
        except Exception as error:  # noqa: BLE001 - torch.OutOfMemoryError, or RuntimeError on old versions
            if is_out_of_memory(error) and self._torch.cuda.is_available():
                self._torch.cuda.empty_cache()  # so that a retry with fewer patches finds the memory free
            raise

    def _predict_flips(self, patches: np.ndarray) -> Any:
        torch = self._torch
        with torch.no_grad():
            batch = torch.from_numpy(patches).to(self._device)
            summed = None
            for flip in self.flips:
                inputs = torch.flip(batch, flip) if flip else batch
                output = self._model(inputs, training=False).to(torch.float32)
                if flip:
                    output = torch.flip(output, flip)
                if summed is None:
                    self._check_classes(output.shape, patches.shape)
                summed = output if summed is None else summed + output
        return summed

    def _add_background(self, starts: np.ndarray) -> None:
        torch = self._torch
        background = torch.zeros((len(starts),) + self.patch + (self.classes,), dtype=torch.float32,
                                 device=self._device)
        background[..., 0] = float(self.passes)
        self._blend(background, starts)

    def _averages(self, zs: slice, ys: slice, xs: slice) -> Any:
        weights = self._weight_sums[zs, ys, xs]
        if self.passes != 1:
            weights = weights * float(self.passes)
        return self._sums[zs, ys, xs].float() / weights[..., None]

    def _labels(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        torch = self._torch
        averages = self._averages(zs, ys, xs)
        top = averages.amax(dim=-1, keepdim=True)
        classes = torch.arange(self.classes, device=self._device)
        index = torch.where(averages == top, classes, torch.full_like(classes, self.classes))
        return index.amin(dim=-1).cpu().numpy()

    def _max_probability(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        return self._averages(zs, ys, xs).amax(dim=-1).to(self._torch.float16).cpu().numpy()

    def _probabilities(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        return self._averages(zs, ys, xs).cpu().numpy()


def _torch_device(model: Any) -> Any:
    """Where the model's weights live (Keras' torch backend keeps them on its device)."""
    import torch

    for variable in getattr(model, "weights", []):
        value = getattr(variable, "value", None)
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------------------
class JaxBlender(DeviceBlender):
    """Sums in JAX arrays, replaced per batch by a jitted update that donates the old ones.

    Batches are padded to the largest seen (``rows``) and only the first ``count`` tiles are added, so
    the model and the update compile once per volume shape.
    """

    def __init__(self, model: Any, *arguments: Any) -> None:
        super().__init__(*arguments)
        import jax
        import jax.numpy as jnp

        self._jax, self._jnp = jax, jnp
        self._weights_of_model = ([v.value for v in model.trainable_variables],
                                  [v.value for v in model.non_trainable_variables])
        self._sums = jnp.zeros(self.shape + (self.classes,), self.accumulation)
        self._weight_sums = jnp.zeros(self.shape, jnp.float32)
        self._tile_weights = jnp.asarray(self.weights)
        flips, classes = self.flips, self.classes

        def predict(trainable: Any, non_trainable: Any, batch: Any) -> Any:
            summed = None
            for flip in flips:
                inputs = jnp.flip(batch, flip) if flip else batch
                output = model.stateless_call(trainable, non_trainable, inputs, training=False)[0]
                output = output.astype(jnp.float32)
                output = jnp.flip(output, flip) if flip else output
                summed = output if summed is None else summed + output
            return summed

        self._jitted_predict = jax.jit(predict)
        self._update = jax.jit(self._update_python, donate_argnums=(0, 1))
        self._background = jax.jit(lambda n: jnp.zeros((n,) + self.patch + (classes,), jnp.float32)
                                   .at[..., 0].set(float(self.passes)), static_argnums=0)
        self.rows = 0

    def _update_python(self, sums: Any, weight_sums: Any, predictions: Any, starts: Any, count: Any) -> Any:
        """``sums`` and ``weight_sums`` with the first ``count`` tiles added (both donated)."""
        jax, jnp = self._jax, self._jnp
        lax = jax.lax
        weights = self._tile_weights
        per_class = weights[..., None]

        def add_tile(i: Any, state: Any) -> Any:
            sums, weight_sums = state
            z, y, x = starts[i, 0], starts[i, 1], starts[i, 2]
            region = lax.dynamic_slice(sums, (z, y, x, 0), self.patch + (self.classes,))
            region = (region.astype(jnp.float32) + predictions[i] * per_class).astype(sums.dtype)
            sums = lax.dynamic_update_slice(sums, region, (z, y, x, 0))
            counted = lax.dynamic_slice(weight_sums, (z, y, x), self.patch) + weights
            return sums, lax.dynamic_update_slice(weight_sums, counted, (z, y, x))

        return lax.fori_loop(0, count, add_tile, (sums, weight_sums))

    def _padded(self, array: np.ndarray) -> np.ndarray:
        """``array`` with zero rows up to :attr:`rows` (one compiled shape)."""
        self.rows = max(self.rows, len(array))
        if len(array) == self.rows:
            return array
        return np.concatenate([array, np.zeros((self.rows - len(array),) + array.shape[1:], array.dtype)])

    def _blend(self, predictions: Any, starts: np.ndarray) -> None:
        self._sums, self._weight_sums = self._update(self._sums, self._weight_sums, predictions,
                                                     self._padded(starts), len(starts))

    def _predict(self, patches: np.ndarray) -> Any:
        summed = self._jitted_predict(*self._weights_of_model, self._padded(patches))
        self._check_classes((len(patches),) + tuple(summed.shape[1:]), patches.shape)
        return summed

    def _add_background(self, starts: np.ndarray) -> None:
        self.rows = max(self.rows, len(starts))
        self._blend(self._background(self.rows), starts)

    def _averages(self, zs: slice, ys: slice, xs: slice) -> Any:
        weights = self._weight_sums[zs, ys, xs]
        if self.passes != 1:
            weights = weights * float(self.passes)
        return self._sums[zs, ys, xs].astype(self._jnp.float32) / weights[..., None]

    def _labels(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        jnp = self._jnp
        averages = self._averages(zs, ys, xs)
        top = averages.max(axis=-1, keepdims=True)
        index = jnp.where(averages == top, jnp.arange(self.classes), self.classes)
        return np.asarray(index.min(axis=-1))

    def _max_probability(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        return np.asarray(self._averages(zs, ys, xs).max(axis=-1).astype(self._jnp.float16))

    def _probabilities(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        return np.asarray(self._averages(zs, ys, xs))

