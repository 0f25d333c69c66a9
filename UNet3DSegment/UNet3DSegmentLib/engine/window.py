"""Sliding-window inference: tile a volume, run any predictor on batches of patches, blend.

The tiling does not care what runs the network: ``predict`` is any callable mapping a batch of
patches ``(n, pz, py, px, c)`` to per-voxel outputs ``(n, pz, py, px, k)`` (usually softmax
probabilities). Numpy only; no TensorFlow here.

Axis order: the image is channels-last ``(z, y, x, c)``; ``patch_size`` is ``(z, y, x)``.

The work is split into small pure parts: :func:`tile_starts` / :func:`grid_starts` (where tiles
go), :func:`importance_map` (cached blending weights), :func:`assemble_batch` (patches into a
preallocated buffer), :func:`predict_batch` (predictor call, shape check, test-time flips) and
:func:`accumulate` (weighted sums into the output). :func:`sliding_window_predict` ties them
together as a three-stage pipeline: a producer thread assembles the next batch
(:func:`iter_assembled_batches`), a model thread runs the predictor (:func:`iter_predictions`), and
the caller's thread blends the previous batch meanwhile. On a GPU, where a batch of the seed network
takes milliseconds, this keeps the numpy work off the model's critical path.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from ..base.errors import BadInputError, CancelledError, UNet3DSegmentError

Start = Tuple[int, int, int]
Predictor = Callable[[np.ndarray], np.ndarray]
ProgressCallback = Callable[[int, int], None]

BLENDS = ("gaussian", "constant")
ACCUMULATIONS = ("float32", "float16")
GAUSSIAN_SIGMA_SCALE = 1.0 / 8.0  # sigma = patch side / 8 per axis (as nnU-Net)
# Smallest blending weight with float16 sums: the Gaussian's ~1e-11 corners would underflow float16
# (smallest value ~6e-8) and leave voxels that only tile corners cover at 0 instead of their value.
FLOAT16_MIN_WEIGHT = 1.0 / 1024.0


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def validate_overlap(overlap: float) -> float:
    """Return ``overlap`` as a float, or raise :class:`BadInputError` unless 0 <= overlap < 1."""
    try:
        value = float(overlap)
    except (TypeError, ValueError) as error:
        raise BadInputError(f"overlap must be a number >= 0 and < 1, got {overlap!r}") from error
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise BadInputError(f"overlap must be >= 0 and < 1, got {overlap}")
    return value


def validate_patch(patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Return ``patch_size`` as a 3-tuple of positive ints (z, y, x), or raise BadInputError."""
    try:
        patch = tuple(int(p) for p in patch_size)
        exact = all(int(p) == p for p in patch_size)
    except (TypeError, ValueError) as error:
        raise BadInputError(
            f"patch size must be three positive integers (z, y, x), got {patch_size!r}"
        ) from error
    if len(patch) != 3 or not exact or any(p < 1 for p in patch):
        raise BadInputError(
            f"patch size must be three positive integers (z, y, x), got {tuple(patch_size)!r}"
        )
    return patch  # type: ignore[return-value]


def validate_batch_size(batch_size: int) -> int:
    """Return ``batch_size`` as an int >= 1, or raise BadInputError."""
    if isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool):
        if batch_size >= 1:
            return int(batch_size)
    raise BadInputError(f"batch size must be an integer >= 1, got {batch_size!r}")


def validate_blend(blend: str) -> str:
    """Return ``blend`` if it is a known blending mode, else raise BadInputError."""
    if blend not in BLENDS:
        raise BadInputError(f"blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    return blend


def validate_mirror_axes(mirror_axes: Optional[Sequence[int]]) -> tuple[int, ...]:
    """Return the sorted, de-duplicated spatial axes to mirror (subset of 0, 1, 2), else raise."""
    if mirror_axes is None:
        return ()
    try:
        axes = tuple(sorted({int(a) for a in mirror_axes}))
    except (TypeError, ValueError) as error:
        raise BadInputError(
            f"mirror axes must be a subset of (0, 1, 2) (z, y, x), got {mirror_axes!r}"
        ) from error
    if any(a not in (0, 1, 2) for a in axes):
        raise BadInputError(
            f"mirror axes must be a subset of (0, 1, 2) (z, y, x), got {tuple(mirror_axes)!r}"
        )
    return axes


def _validate_image(image: np.ndarray, expected_channels: Optional[int]) -> np.ndarray:
    """Return ``image`` as a float32 (z, y, x, c) array (no copy if it already is one)."""
    array = np.asarray(image)
    if array.ndim != 4:
        raise BadInputError(
            f"image must be 4-D channels-last (z, y, x, c), got {array.ndim}-D shape "
            f"{array.shape}; "
            "add a trailing channel axis for single-channel volumes"
        )
    if 0 in array.shape:
        raise BadInputError(f"image must not have an empty axis, got shape {array.shape}")
    if expected_channels is not None and array.shape[3] != expected_channels:
        raise BadInputError(
            f"image has {array.shape[3]} channel(s), the model expects {expected_channels}; "
            "give one input volume per model input channel"
        )
    return np.asarray(array, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------------
def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced tile starts along one axis, from 0 to flush with the far edge.

    The largest allowed step is ``floor(patch * (1 - overlap))`` voxels (at least 1), so
    neighbouring tiles always overlap by at least ``overlap``; the number of tiles is the fewest
    that allows it, and the integer starts are spread evenly (rounded; no step exceeds the allowed
    one). The last start is ``size - patch``; an axis no longer than the patch gets the start 0.
    """
    overlap = validate_overlap(overlap)
    size, patch = int(size), int(patch)
    if patch < 1 or size < 1:
        raise BadInputError(f"size and patch must be positive, got size {size}, patch {patch}")
    if size <= patch:
        return [0]
    span = size - patch
    # 1e-9 guards against 64 * (1 - 0.9) = 6.3999... style float error dropping a whole voxel.
    max_step = max(1, math.floor(patch * (1.0 - overlap) + 1e-9))
    intervals = -(-span // max_step)  # ceil
    # i * span / intervals rounded half up: consecutive steps differ by at most one voxel.
    return [(2 * i * span + intervals) // (2 * intervals) for i in range(intervals + 1)]


def grid_starts(
    shape_zyx: Sequence[int], patch_size: Sequence[int], overlap: float
) -> list[Start]:
    """All tile starts ``(z, y, x)`` of a volume, z slowest, x fastest (C order)."""
    patch = validate_patch(patch_size)
    shape = tuple(int(s) for s in shape_zyx)
    if len(shape) != 3:
        raise BadInputError(f"volume shape must be three sizes (z, y, x), got {tuple(shape_zyx)!r}")
    per_axis = [tile_starts(s, p, overlap) for s, p in zip(shape, patch)]
    return list(itertools.product(*per_axis))  # type: ignore[arg-type]


def count_patches(shape_zyx: Sequence[int], patch_size: Sequence[int], overlap: float) -> int:
    """Number of tiles :func:`grid_starts` yields (one predictor pass, without test-time flips)."""
    patch = validate_patch(patch_size)
    return math.prod(
        len(tile_starts(s, p, overlap)) for s, p in zip(tuple(int(s) for s in shape_zyx), patch)
    )


# --------------------------------------------------------------------------------------------------
# Blending weights
# --------------------------------------------------------------------------------------------------
def importance_map(patch_size: Sequence[int], blend: str = "gaussian") -> np.ndarray:
    """Per-voxel blending weight of a tile, float32 ``(pz, py, px)``, read-only and cached.

    ``"constant"``: all ones (plain averaging). ``"gaussian"``: a separable Gaussian centred on the
    tile (at ``(p - 1) / 2``, so it is mirror-symmetric) with sigma = side / 8 per axis, maximum 1;
    the tile border, where the network sees least context, counts least. Values are clamped to the
    smallest positive value so that no voxel ever gets weight 0 (every voxel is covered by a tile).
    """
    return _importance_map_cached(validate_patch(patch_size), validate_blend(blend))


@lru_cache(maxsize=8)
def _importance_map_cached(patch: tuple[int, int, int], blend: str) -> np.ndarray:
    if blend == "constant":
        weights = np.ones(patch, dtype=np.float32)
    else:
        weights = gaussian_weights(patch, GAUSSIAN_SIGMA_SCALE)
    weights.setflags(write=False)
    return weights


def gaussian_weights(patch: tuple[int, int, int], sigma_scale: float) -> np.ndarray:
    """Separable Gaussian, sigma = side * ``sigma_scale``, max 1, zeros raised to the least value.

    With sigma = side / 8 nothing underflows (corners are ~4 sigma out per axis, ~4e-11); the clamp
    guards narrower Gaussians, where a zero weight would leave tile corners undefined.
    """
    profiles = []
    for side in patch:
        offset = np.arange(side, dtype=np.float64) - (side - 1) / 2.0
        profile = np.exp(-0.5 * (offset / (side * sigma_scale)) ** 2)
        profiles.append(profile / profile.max())
    weights = np.multiply.outer(np.multiply.outer(profiles[0], profiles[1]), profiles[2])
    weights = weights.astype(np.float32)
    positive = weights > 0
    if not positive.all():
        weights[~positive] = weights[positive].min()
    return weights


# --------------------------------------------------------------------------------------------------
# Core loop parts
# --------------------------------------------------------------------------------------------------
def iter_batches(starts: Sequence[Start], batch_size: int) -> Iterator[Sequence[Start]]:
    """Consecutive groups of at most ``batch_size`` tile starts."""
    for first in range(0, len(starts), batch_size):
        yield starts[first:first + batch_size]


def assemble_batch(
    image: np.ndarray, starts: Sequence[Start], patch: tuple[int, int, int], buffer: np.ndarray
) -> np.ndarray:
    """Copy the patches at ``starts`` into ``buffer[:n]`` (no allocation) and return that view."""
    pz, py, px = patch
    for i, (z, y, x) in enumerate(starts):
        buffer[i] = image[z:z + pz, y:y + py, x:x + px]
    return buffer[: len(starts)]


def _flip_sets(mirror_axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every subset of ``mirror_axes`` as batch-array axes (spatial axis + 1); first is no flip."""
    return [
        tuple(a + 1 for a in combo)
        for r in range(len(mirror_axes) + 1)
        for combo in itertools.combinations(mirror_axes, r)
    ]


def _checked_prediction(
    predict: Predictor, batch: np.ndarray, classes: Optional[int]
) -> np.ndarray:
    """Call ``predict`` and check it gives one output per voxel of every patch."""
    prediction = np.asarray(predict(batch))
    expected_head = batch.shape[:4]
    if (
        prediction.ndim != 5
        or prediction.shape[:4] != expected_head
        or (classes is not None and prediction.shape[4] != classes)
        or prediction.shape[4] < 1
    ):
        expected = ", ".join(str(d) for d in expected_head) + f", {classes or 'k'}"
        raise BadInputError(
            f"predictor returned shape {prediction.shape}, expected ({expected}); it must map "
            "(n, z, y, x, channels) patches to (n, z, y, x, classes) outputs of the same size"
        )
    return prediction


class BatchBuffers:
    """Preallocated arrays the core loop reuses for every batch (nothing is allocated per patch).

    ``patches`` holds the assembled batch, ``flipped`` its mirrored copy for test-time flips, and
    ``predictions`` the summed predictor outputs; the last two are made on first use, because the
    number of classes is known only after the first predictor call.
    """

    def __init__(self, rows: int, patch: tuple[int, int, int], channels: int) -> None:
        self.patches = np.empty((rows,) + patch + (channels,), dtype=np.float32)
        self._flipped: Optional[np.ndarray] = None
        self._predictions: Optional[np.ndarray] = None

    @property
    def classes(self) -> Optional[int]:
        """Number of predictor outputs per voxel, once known."""
        return None if self._predictions is None else self._predictions.shape[4]

    def flipped(self, n: int) -> np.ndarray:
        """The first ``n`` rows of the mirrored-input buffer."""
        if self._flipped is None:
            self._flipped = np.empty_like(self.patches)
        return self._flipped[:n]

    def predictions(self, n: int, classes: int) -> np.ndarray:
        """The first ``n`` rows of the float32 prediction buffer with ``classes`` outputs."""
        if self._predictions is None:
            self._predictions = np.empty(self.patches.shape[:4] + (classes,), dtype=np.float32)
        return self._predictions[:n]


def predict_batch(
    predict: Predictor,
    batch: np.ndarray,
    flips: Sequence[tuple[int, ...]],
    buffers: BatchBuffers,
    before_call: Callable[[], None],
    after_call: Callable[[int], None],
) -> np.ndarray:
    """Sum of the predictions over every flip in ``flips`` (flip input, predict, flip back).

    ``flips`` holds batch-array axes to mirror, its first entry ``()`` being the plain pass.
    ``before_call`` runs before each predictor call (the cancel check), ``after_call(n)`` after it
    (progress). Returns a view of ``buffers``' float32 prediction buffer, ``(n, pz, py, px, k)``.
    """
    n = batch.shape[0]
    before_call()
    first = _one_pass(predict, batch, flips[0], buffers)
    summed = buffers.predictions(n, first.shape[4])
    np.copyto(summed, first, casting="same_kind")
    after_call(n)
    for flip in flips[1:]:
        before_call()
        np.add(summed, _one_pass(predict, batch, flip, buffers), out=summed, casting="same_kind")
        after_call(n)
    return summed


def _one_pass(
    predict: Predictor, batch: np.ndarray, flip: tuple[int, ...], buffers: BatchBuffers
) -> np.ndarray:
    """Predict ``batch`` mirrored along the batch-array axes ``flip``; return it mirrored back."""
    if not flip:
        return _checked_prediction(predict, batch, buffers.classes)
    mirrored = buffers.flipped(batch.shape[0])
    np.copyto(mirrored, np.flip(batch, flip))
    return np.flip(_checked_prediction(predict, mirrored, buffers.classes), flip)


def accumulate(
    output: np.ndarray,
    weight_sum: np.ndarray,
    prediction: np.ndarray,
    starts: Sequence[Start],
    weights: np.ndarray,
) -> None:
    """Add each tile's ``prediction * weights`` into ``output`` and ``weights`` into ``weight_sum``.

    ``prediction`` is overwritten (weighted in place) to avoid a temporary per tile.
    """
    np.multiply(prediction, weights[np.newaxis, ..., np.newaxis], out=prediction)
    pz, py, px = weights.shape
    for i, (z, y, x) in enumerate(starts):
        output[z:z + pz, y:y + py, x:x + px] += prediction[i]
        weight_sum[z:z + pz, y:y + py, x:x + px] += weights


def _pad_to_patch(
    image: np.ndarray, patch: tuple[int, int, int]
) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Zero-pad axes shorter than the patch, image centred; return it and the crop back."""
    shape = image.shape[:3]
    if all(s >= p for s, p in zip(shape, patch)):
        return image, (slice(None), slice(None), slice(None))
    before = [max(p - s, 0) // 2 for s, p in zip(shape, patch)]
    after = [max(p - s, 0) - b for s, p, b in zip(shape, patch, before)]
    padded = np.pad(image, list(zip(before, after)) + [(0, 0)], mode="constant")
    crop = tuple(slice(b, b + s) for b, s in zip(before, shape))
    return padded, crop  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Bounded-memory accumulation and the prefetching producer
# --------------------------------------------------------------------------------------------------
def validate_accumulation(accumulation: str) -> np.dtype:
    """The accumulator dtype for ``"float32"`` (default, exact) or ``"float16"`` (half the memory)."""
    if accumulation not in ACCUMULATIONS:
        raise BadInputError(f"accumulation must be one of {', '.join(ACCUMULATIONS)}, got {accumulation!r}")
    return np.dtype(accumulation)


def ring_depth(starts: Sequence[Start], rows: int, patch_z: int, size_z: int) -> int:
    """Rows along z the accumulator must hold so that every batch fits into it.

    Before a batch runs, every voxel above its first tile's z start is final (tiles come z-slowest),
    so the rows still open span from that start to the batch's last tile's start plus the patch.
    """
    depth = patch_z
    for batch in iter_batches(starts, rows):
        depth = max(depth, batch[-1][0] - batch[0][0] + patch_z)
    return min(depth, size_z)


def _ring_pieces(first: int, stop: int, depth: int) -> list[tuple[slice, slice]]:
    """(ring rows, local rows) pairs covering absolute rows ``first:stop`` of a ring of ``depth``."""
    start, length = first % depth, stop - first
    if start + length <= depth:
        return [(slice(start, start + length), slice(0, length))]
    head = depth - start
    return [(slice(start, depth), slice(0, head)), (slice(0, length - head), slice(head, length))]


class SlabAccumulator:
    """Weighted sums of tile outputs over a ring of ``depth`` z rows (not the whole volume).

    Rows are addressed by their absolute z; row ``z`` lives at ``z % depth``, so finished rows are
    taken out (divided by their weight sum) and cleared without moving the others. Outputs sum in
    ``dtype`` (float32, or float16 to halve the largest buffer); weights always sum in float32.

    ``pool`` (a thread pool with ``bands`` workers) splits each batch's additions into bands along y,
    so that several cores blend at once; each voxel still gets its tiles' terms in the same order, so
    the sums are bit-for-bit those of one thread. On a GPU the blending otherwise limits the speed.
    """

    def __init__(
        self,
        depth: int,
        shape_yx: tuple[int, int],
        classes: int,
        dtype: np.dtype,
        pool: Optional[ThreadPoolExecutor] = None,
        bands: int = 1,
    ) -> None:
        self.depth = depth
        self.sums = np.zeros((depth,) + tuple(shape_yx) + (classes,), dtype=dtype)
        self.weights = np.zeros((depth,) + tuple(shape_yx), dtype=np.float32)
        self._pool = pool if bands > 1 else None
        self._bands = _band_edges(shape_yx[0], bands if self._pool is not None else 1)
        self._class_weights: Optional[np.ndarray] = None
        self._class_weights_of: Optional[np.ndarray] = None  # the weights it was made from

    @property
    def nbytes(self) -> int:
        return self.sums.nbytes + self.weights.nbytes

    def add(self, prediction: np.ndarray, starts: Sequence[Start], weights: np.ndarray) -> None:
        """Add each tile's ``prediction * weights`` (``prediction`` is weighted in place)."""
        np.multiply(prediction, self._weights_per_class(weights, prediction.shape[4])[np.newaxis], out=prediction)
        if self._pool is None:
            self._add_band(prediction, starts, weights, 0, self.sums.shape[1])
            return
        jobs = [self._pool.submit(self._add_band, prediction, starts, weights, low, high)
                for low, high in self._bands]
        for job in jobs:
            job.result()

    def _weights_per_class(self, weights: np.ndarray, classes: int) -> np.ndarray:
        """``weights`` repeated along a last axis of ``classes`` (contiguous: a flat, fast multiply)."""
        if self._class_weights is None or self._class_weights_of is not weights:
            shape = weights.shape + (classes,)
            self._class_weights = np.ascontiguousarray(np.broadcast_to(weights[..., np.newaxis], shape))
            self._class_weights_of = weights
        return self._class_weights

    def _add_band(self, prediction: np.ndarray, starts: Sequence[Start], weights: np.ndarray, low: int,
                  high: int) -> None:
        """The additions of every tile in ``starts`` that fall in rows ``low:high`` along y."""
        pz, py, px = weights.shape
        for i, (z, y, x) in enumerate(starts):
            top, bottom = max(y, low), min(y + py, high)
            if top >= bottom:
                continue
            inside = slice(top - y, bottom - y)
            for ring, local in _ring_pieces(z, z + pz, self.depth):
                self.sums[ring, top:bottom, x:x + px] += prediction[i, local, inside]
                self.weights[ring, top:bottom, x:x + px] += weights[local, inside]

    def take(self, first: int, stop: int, passes: int = 1) -> np.ndarray:
        """Rows ``first:stop`` as float32 weighted averages (sums / (weights * passes)); then cleared."""
        out = np.empty((stop - first,) + self.sums.shape[1:], dtype=np.float32)
        for ring, local in _ring_pieces(first, stop, self.depth):
            weight = self.weights[ring] if passes == 1 else self.weights[ring] * np.float32(passes)
            np.divide(self.sums[ring], weight[..., np.newaxis], out=out[local])
            self.sums[ring] = 0
            self.weights[ring] = 0
        return out


def _band_edges(size: int, bands: int) -> list[tuple[int, int]]:
    """``bands`` near-equal ``(low, high)`` ranges covering ``0:size`` (fewer if ``size`` is small)."""
    bands = max(1, min(bands, size))
    edges = [round(size * k / bands) for k in range(bands + 1)]
    return [(low, high) for low, high in zip(edges, edges[1:]) if high > low]


def blend_threads(cores: Optional[int] = None) -> int:
    """Threads for blending: one per 4 cores, at most 4 (one on small machines, whose cores run the model)."""
    if cores is None:
        from .loading import cpu_cores  # no framework import: model_io loads TensorFlow only when asked

        cores = cpu_cores()
    return max(1, min(4, cores // 4))


Release = Callable[[], None]
_DONE = object()


def iter_assembled_batches(
    image: np.ndarray,
    batches: Sequence[Sequence[Start]],
    patch: tuple[int, int, int],
    rows: int,
    prefetch: bool = True,
) -> Iterator[tuple[Sequence[Start], np.ndarray, Release]]:
    """Yield ``(starts, batch, release)``; call ``release()`` once the predictor is done with ``batch``.

    With ``prefetch`` a producer thread assembles the next batch into a second buffer while the model
    runs on the current one (double buffering: a buffer is refilled only after its release). Without
    it, one buffer is filled in turn. Errors in the producer are raised here; closing the generator
    stops the producer.
    """
    channels = image.shape[3]
    if not prefetch:
        buffer = np.empty((rows,) + patch + (channels,), dtype=np.float32)
        for starts in batches:
            yield starts, assemble_batch(image, starts, patch, buffer), _no_release
        return

    free: queue.Queue = queue.Queue()
    for _ in range(2):
        free.put(np.empty((rows,) + patch + (channels,), dtype=np.float32))
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    def produce() -> None:
        try:
            for starts in batches:
                buffer = _take_free(free, stop)
                if buffer is None:
                    return
                ready.put((starts, assemble_batch(image, starts, patch, buffer), buffer))
            ready.put(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put(error)

    yield from _stage_results(produce, "unet3d-prefetch", ready, free, stop)


def _stage_results(
    target: Callable[[], None], name: str, ready: queue.Queue, free: queue.Queue, stop: threading.Event
) -> Iterator[tuple[Sequence[Start], np.ndarray, Release]]:
    """Run ``target`` on a daemon thread and yield what it puts in ``ready``, in order.

    ``target`` puts ``(starts, array, buffer)`` items, then ``_DONE``, or the exception it met (raised
    here). Each item is yielded as ``(starts, array, release)``; ``release()`` gives ``buffer`` back
    to ``free``. Closing this generator sets ``stop`` and waits briefly for the thread.
    """
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            starts, array, buffer = item
            yield starts, array, (lambda b=buffer: free.put(b))
    finally:
        stop.set()
        thread.join(timeout=5.0)


def _no_release() -> None:
    return None


def iter_predictions(
    source: Iterator[tuple[Sequence[Start], np.ndarray, Release]],
    predict: Predictor,
    flips: Sequence[tuple[int, ...]],
    rows: int,
    patch: tuple[int, int, int],
    channels: int,
    before_call: Callable[[], None],
    threaded: bool = True,
) -> Iterator[tuple[Sequence[Start], np.ndarray, Release]]:
    """Yield ``(starts, prediction, release)`` for each batch of ``source``, in order.

    ``prediction`` is the float32 sum over ``flips`` (see :func:`predict_batch`), which the caller may
    overwrite until it calls ``release()``. With ``threaded`` a model thread predicts the next batch
    into a second buffer while the caller blends this one; errors there (a cancel raised by
    ``before_call`` too) are raised here. This generator owns ``source`` and closes it.
    """
    if not threaded:
        buffers = BatchBuffers(rows, patch, channels)
        try:
            for starts, batch, release in source:
                prediction = predict_batch(predict, batch, flips, buffers, before_call, _ignore_count)
                release()
                yield starts, prediction, _no_release
        finally:
            source.close()
        return

    free: queue.Queue = queue.Queue()
    for _ in range(2):
        free.put(BatchBuffers(rows, patch, channels))
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        classes: Optional[int] = None  # from the first prediction; every later one must match it
        try:
            for starts, batch, release in source:
                buffers = _take_free(free, stop)
                if buffers is None:
                    return
                if classes is not None and buffers.classes is None:
                    buffers.predictions(rows, classes)  # so the second buffer checks the class count too
                prediction = predict_batch(predict, batch, flips, buffers, before_call, _ignore_count)
                classes = prediction.shape[4]
                release()
                ready.put((starts, prediction, buffers))
            ready.put(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put(error)
        finally:
            source.close()

    yield from _stage_results(work, "unet3d-model", ready, free, stop)


def _ignore_count(n: int) -> None:
    return None


def _take_free(free: queue.Queue, stop: threading.Event) -> Optional[np.ndarray]:
    """A free buffer, or None once ``stop`` is set (checked every 0.1 s while waiting)."""
    while not stop.is_set():
        try:
            return free.get(timeout=0.1)
        except queue.Empty:
            continue
    return None


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------
def iter_probability_slabs(
    image: np.ndarray,
    predict: Predictor,
    patch_size: Sequence[int] = (64, 64, 64),
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 2,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    mirror_axes: Optional[Sequence[int]] = None,
    expected_channels: Optional[int] = None,
    accumulation: str = "float32",
    prefetch: bool = True,
) -> Iterator[tuple[int, np.ndarray]]:
    """Like :func:`sliding_window_predict`, but yields the result in finished z slabs.

    Yields ``(z_first, probabilities)`` with ``probabilities`` float32 ``(n, y, x, k)`` for rows
    ``z_first:z_first + n`` of the image, in z order, covering every row once. The values equal
    :func:`sliding_window_predict`'s exactly (same sums in the same order). Only a ring of
    :func:`ring_depth` rows (about one patch plus one step) is accumulated, so memory does not grow
    with the volume's depth. ``accumulation="float16"`` halves that ring (sums rounded to ~3 digits).
    ``prefetch`` assembles the next batch on a producer thread and runs the model on a thread of its
    own, so that assembling and blending overlap the model's work (off: everything in turn on the
    caller's thread; the values are the same either way). With float16
    sums the blending weights are raised to at least ``FLOAT16_MIN_WEIGHT`` (no underflow).
    """
    image = _validate_image(image, expected_channels)
    patch = validate_patch(patch_size)
    overlap = validate_overlap(overlap)
    weights = importance_map(patch, blend)
    batch_size = validate_batch_size(batch_size)
    flips = _flip_sets(validate_mirror_axes(mirror_axes))
    dtype = validate_accumulation(accumulation)
    if dtype == np.float16:
        weights = np.maximum(weights, np.float32(FLOAT16_MIN_WEIGHT))
    return _slabs(image, predict, patch, overlap, weights, batch_size, progress, cancel, flips, dtype,
                  prefetch)


def _slabs(
    image: np.ndarray,
    predict: Predictor,
    patch: tuple[int, int, int],
    overlap: float,
    weights: np.ndarray,
    batch_size: int,
    progress: Optional[ProgressCallback],
    cancel: Optional[threading.Event],
    flips: list[tuple[int, ...]],
    dtype: np.dtype,
    prefetch: bool,
) -> Iterator[tuple[int, np.ndarray]]:
    """The generator behind :func:`iter_probability_slabs` (arguments already validated)."""
    padded, crop = _pad_to_patch(image, patch)
    shape = padded.shape[:3]
    starts = grid_starts(shape, patch, overlap)
    total = len(starts) * len(flips)
    done = 0

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise CancelledError(f"cancelled after {done} of {total} patches")

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    rows = min(batch_size, len(starts))
    batches = list(iter_batches(starts, rows))
    depth = ring_depth(starts, rows, patch[0], shape[0])
    ring: Optional[SlabAccumulator] = None
    finished = 0  # rows before this one are final and were yielded

    def finish(stop: int) -> Iterator[tuple[int, np.ndarray]]:
        nonlocal finished
        first, finished = finished, stop
        kept = range(max(first, crop[0].start or 0), min(stop, crop[0].stop or shape[0]))
        if ring is None or stop <= first:
            return
        values = ring.take(first, stop, len(flips))
        if len(kept):
            part = values[kept.start - first:kept.stop - first, crop[1], crop[2]]
            yield kept.start - (crop[0].start or 0), np.ascontiguousarray(part)

    source = iter_assembled_batches(padded, batches, patch, rows, prefetch)
    predictions = iter_predictions(source, predict, flips, rows, patch, padded.shape[3], check_cancel,
                                   threaded=prefetch)
    bands = blend_threads() if prefetch else 1
    pool = ThreadPoolExecutor(max_workers=bands, thread_name_prefix="unet3d-blend") if bands > 1 else None
    try:
        for batch_starts, prediction, release in predictions:
            yield from finish(batch_starts[0][0])
            if ring is None:
                ring = SlabAccumulator(depth, shape[1:], prediction.shape[4], dtype, pool, bands)
            ring.add(prediction, batch_starts, weights)
            release()
            for _ in flips:  # one progress step per predictor call, as the calls were made
                report(len(batch_starts))
            check_cancel()  # here too: the model thread may already be one batch ahead
        yield from finish(shape[0])
    finally:
        predictions.close()
        if pool is not None:
            pool.shutdown(wait=True)


def sliding_window_predict(
    image: np.ndarray,
    predict: Predictor,
    patch_size: Sequence[int] = (64, 64, 64),
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 2,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    mirror_axes: Optional[Sequence[int]] = None,
    expected_channels: Optional[int] = None,
    accumulation: str = "float32",
    prefetch: bool = True,
) -> np.ndarray:
    """Blend ``predict``'s outputs over overlapping tiles into one ``(z, y, x, k)`` float32 array.

    Args:
        image: channels-last ``(z, y, x, c)`` volume (converted to float32). Axes shorter than the
            patch are zero-padded (image centred) and the output is cropped back.
        predict: maps ``(n, pz, py, px, c)`` float32 patches to ``(n, pz, py, px, k)``. It must not
            keep a reference to its input: the batch buffer is reused.
        patch_size: ``(z, y, x)`` tile size the predictor takes.
        overlap: fraction of a tile shared with its neighbour along each axis, ``0 <= overlap < 1``.
        blend: ``"gaussian"`` (centre of a tile weighs most) or ``"constant"`` (plain average).
        batch_size: tiles per predictor call.
        progress: called as ``progress(done, total)`` after every predictor call, in patches;
            ``total`` counts every test-time-augmentation pass.
        cancel: checked before every predictor call; when set, :class:`CancelledError` is raised.
        mirror_axes: spatial axes (subset of 0, 1, 2 = z, y, x) for test-time augmentation: the
            prediction is averaged over all ``2 ** len(mirror_axes)`` flip combinations.
        expected_channels: if given, the image's channel count must equal it.
        accumulation: ``"float32"`` or ``"float16"`` sums (see :func:`iter_probability_slabs`).
        prefetch: assemble batches on a producer thread and run the model on its own thread, so that
            assembling and blending overlap the model's work (same values either way).

    Returns:
        The weighted average of the tiles' outputs at every voxel, float32 ``(z, y, x, k)``.
    """
    output: Optional[np.ndarray] = None
    for first, slab in iter_probability_slabs(
        image, predict, patch_size, overlap, blend, batch_size, progress, cancel, mirror_axes,
        expected_channels, accumulation, prefetch,
    ):
        if output is None:
            output = np.empty((np.shape(image)[0],) + slab.shape[1:], dtype=np.float32)
        output[first:first + slab.shape[0]] = slab
    if output is None:  # cannot happen: a validated image has at least one row, and each is yielded
        raise UNet3DSegmentError("internal error: the sliding window produced no output")
    return output
