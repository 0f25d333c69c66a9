"""The sliding window's pipeline stages: assemble batches of patches, run the predictor on them.

:func:`iter_assembled_batches` fills batch buffers (on a producer thread with ``prefetch``) and
:func:`iter_predictions` runs the predictor with its test-time flips (:func:`predict_batch`, on a
model thread of its own when threaded); the caller blends meanwhile. Each stage hands out
``(starts, array, release)``: the array is the stage's reused buffer, given back by ``release()``,
so nothing is allocated per batch. Errors on a stage's thread are raised in the caller's thread, and
closing a stage's generator stops its thread. Pure numpy.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..base.errors import BadInputError
from .tiling import Start

Predictor = Callable[[np.ndarray], np.ndarray]
Release = Callable[[], None]
_DONE = object()


def flip_sets(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``mirror_axes`` as batch-array axes (spatial axis + 1); first is no flip."""
    return [
        tuple(a + 1 for a in combo)
        for r in range(len(mirror_axes) + 1)
        for combo in itertools.combinations(mirror_axes, r)
    ]


def assemble_batch(
    image: np.ndarray, starts: Sequence[Start], patch: tuple[int, int, int], buffer: np.ndarray
) -> np.ndarray:
    """Copy the patches at ``starts`` into ``buffer[:n]`` (no allocation) and return that view."""
    pz, py, px = patch
    for i, (z, y, x) in enumerate(starts):
        buffer[i] = image[z:z + pz, y:y + py, x:x + px]
    return buffer[: len(starts)]


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
