"""Sliding-window inference: tile a volume, run any predictor on batches of patches, blend.

The tiling does not care what runs the network: ``predict`` is any callable mapping a batch of
patches ``(n, pz, py, px, c)`` to per-voxel outputs ``(n, pz, py, px, k)`` (usually softmax
probabilities). Numpy only; no TensorFlow here.

Axis order: the image is channels-last ``(z, y, x, c)``; ``patch_size`` is ``(z, y, x)``.

How the window runs is one frozen :class:`WindowConfig` (checked when made; the user options among
its fields are checked by their declarations in ``base/options.py``). The work is split by job:

- ``tiling``: where tiles go (:func:`~.tiling.grid_starts`), batches of starts, padding;
- ``blending``: the cached per-tile weights (:func:`~.blending.importance_map`);
- ``stages``: the producer thread that assembles batches and the model thread that runs the
  predictor with its test-time flips;
- ``accumulator``: the ring of z rows the weighted sums go into (:class:`~.accumulator.SlabAccumulator`).

:func:`iter_probability_slabs` ties them together and yields finished z slabs while the caller's
thread blends; :func:`sliding_window_predict` stacks the slabs into one array.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from ..base.errors import BadInputError, CancelledError, UNet3DSegmentError
from ..base.options import DEFAULT_OVERLAP, SegmentOptions
from .accumulator import SlabAccumulator, blend_threads, ring_depth
from .blending import tile_weights
from .stages import Predictor, flip_sets, iter_assembled_batches, iter_predictions
from .tiling import empty_tiles, grid_starts, pad_to_patch, tile_units, validate_mirror_axes, validate_patch

ProgressCallback = Callable[[int, int], None]
TTA_AXES = (0, 1, 2)  # mirror_axes of test-time augmentation (the ``tta`` option): every spatial axis


@dataclass(frozen=True)
class WindowConfig:
    """How the sliding window runs. Every field is checked (and normalised) when the object is made.

    Args:
        patch_size: ``(z, y, x)`` tile size the predictor takes.
        overlap: fraction of a tile shared with its neighbour along each axis, ``0 <= overlap < 1``.
        blend: ``"gaussian"`` (centre of a tile weighs most) or ``"constant"`` (plain average).
        batch_size: tiles per predictor call.
        mirror_axes: spatial axes (subset of 0, 1, 2 = z, y, x) for test-time augmentation: the
            prediction is averaged over all ``2 ** len(mirror_axes)`` flip combinations. Stored
            sorted and de-duplicated; ``None`` becomes ``()``.
        accumulation: ``"float32"`` or ``"float16"`` sums (float16 halves the ring of sums, which
            then keep ~3 digits; the blending weights are raised to at least ``FLOAT16_MIN_WEIGHT``).
        prefetch: assemble batches on a producer thread and run the model on its own thread, so that
            assembling and blending overlap the model's work (same values either way).
        expected_channels: if given, the image's channel count must equal it.
        skip_empty: do not run the model on tiles whose input is zero in every voxel and channel
            (:func:`~.tiling.empty_tiles`); they count as certain background (class 0) with their
            blending weights. At least one tile always runs.

    ``overlap``, ``blend``, ``batch_size``, ``accumulation`` and ``skip_empty`` are user options: their defaults
    and checks are those of ``SegmentOptions`` (``overlap``: 0.5 when neither the user nor the card gives one).
    """

    patch_size: Sequence[int] = (64, 64, 64)
    overlap: float = DEFAULT_OVERLAP
    blend: str = SegmentOptions.spec("blend").default
    batch_size: int = SegmentOptions.spec("batch_size").default
    mirror_axes: Optional[Sequence[int]] = ()
    accumulation: str = SegmentOptions.spec("accumulation").default
    prefetch: bool = True
    expected_channels: Optional[int] = None
    skip_empty: bool = SegmentOptions.spec("skip_empty").default

    def __post_init__(self) -> None:
        checked = {
            "patch_size": validate_patch(self.patch_size),
            "overlap": DEFAULT_OVERLAP if self.overlap is None else SegmentOptions.spec("overlap").check(self.overlap),
            "blend": SegmentOptions.spec("blend").check(self.blend),
            "batch_size": SegmentOptions.spec("batch_size").check(self.batch_size),
            "mirror_axes": validate_mirror_axes(self.mirror_axes),
            "accumulation": SegmentOptions.spec("accumulation").check(self.accumulation),
            "prefetch": bool(self.prefetch),
            "expected_channels": _check_channels(self.expected_channels),
            "skip_empty": SegmentOptions.spec("skip_empty").check(self.skip_empty),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_options(cls, options: SegmentOptions, patch_size: Sequence[int], prefetch: bool = True,
                     recommended_overlap: Optional[float] = None) -> WindowConfig:
        """The window of a segmentation run: ``options`` (a ``SegmentOptions``) and the model's patch size.

        ``options.tta`` mirrors every spatial axis (:data:`TTA_AXES`). Without an overlap in ``options``
        the model card's ``recommended_overlap`` is used, else 0.5.
        """
        return cls(
            patch_size=patch_size,
            overlap=options.window_overlap(recommended_overlap),
            blend=options.blend,
            batch_size=options.batch_size,
            mirror_axes=TTA_AXES if options.tta else (),
            accumulation=options.accumulation,
            prefetch=prefetch,
            skip_empty=options.skip_empty,
        )


def _check_channels(channels: Optional[int]) -> Optional[int]:
    if channels is None:
        return None
    if isinstance(channels, bool) or not hasattr(channels, "__index__") or channels < 1:
        raise BadInputError(f"expected channels must be an integer >= 1, got {channels!r}")
    return int(channels)


def _resolve(config: Optional[WindowConfig], fields: dict[str, Any]) -> WindowConfig:
    """``config`` with ``fields`` replaced (no ``config``: a new one from ``fields`` and the defaults)."""
    if config is None:
        return WindowConfig(**fields)
    if not isinstance(config, WindowConfig):
        raise TypeError(f"config must be a WindowConfig, got {type(config).__name__}; "
                        "pass patch_size=... and the other fields by keyword")
    return dataclasses.replace(config, **fields) if fields else config


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
# Public entry points
# --------------------------------------------------------------------------------------------------
def iter_probability_slabs(
    image: np.ndarray,
    predict: Predictor,
    config: Optional[WindowConfig] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    **fields: Any,
) -> Iterator[tuple[int, np.ndarray]]:
    """Like :func:`sliding_window_predict`, but yields the result in finished z slabs.

    Yields ``(z_first, probabilities)`` with ``probabilities`` float32 ``(n, y, x, k)`` for rows
    ``z_first:z_first + n`` of the image, in z order, covering every row once. The values equal
    :func:`sliding_window_predict`'s exactly (same sums in the same order). Only a ring of
    :func:`~.accumulator.ring_depth` rows (about one patch plus one step) is accumulated, so memory
    does not grow with the volume's depth. The arguments are checked here, before the first slab.
    """
    config = _resolve(config, fields)
    image = _validate_image(image, config.expected_channels)
    return _slabs(image, predict, config, progress, cancel)


def _slabs(
    image: np.ndarray,
    predict: Predictor,
    config: WindowConfig,
    progress: Optional[ProgressCallback],
    cancel: Optional[threading.Event],
) -> Iterator[tuple[int, np.ndarray]]:
    """The generator behind :func:`iter_probability_slabs` (arguments already checked)."""
    patch = config.patch_size
    weights = tile_weights(patch, config.blend, config.accumulation)
    flips = flip_sets(config.mirror_axes)
    padded, crop = pad_to_patch(image, patch)
    shape = padded.shape[:3]
    starts = grid_starts(shape, patch, config.overlap)
    empty = empty_tiles(padded, starts, patch) if config.skip_empty else [False] * len(starts)
    if all(empty):
        empty[0] = False  # one tile runs: the model's outputs give the class count
    units = tile_units(starts, empty, config.batch_size)
    total = (len(starts) - sum(empty)) * len(flips)
    done = 0

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise CancelledError(f"cancelled after {done} of {total} patches")

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    rows = min(config.batch_size, len(starts))
    batches = [unit for is_empty, unit in units if not is_empty]
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

    source = iter_assembled_batches(padded, batches, patch, rows, config.prefetch)
    predictions = iter_predictions(source, predict, flips, rows, patch, padded.shape[3],
                                   check_cancel, threaded=config.prefetch)
    bands = blend_threads() if config.prefetch else 1
    pool = ThreadPoolExecutor(max_workers=bands, thread_name_prefix="unet3d-blend") if bands > 1 else None
    try:
        first_real = next(predictions)  # the ring is made with the model's class count, before any tile
        ring = SlabAccumulator(depth, shape[1:], first_real[1].shape[4], np.dtype(config.accumulation), pool, bands)
        pending: Optional[tuple] = first_real
        for is_empty, unit in units:
            yield from finish(unit[0][0])
            if is_empty:
                ring.add_background(unit, weights, len(flips))
                continue
            batch_starts, prediction, release = pending if pending is not None else next(predictions)
            pending = None
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
    config: Optional[WindowConfig] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    **fields: Any,
) -> np.ndarray:
    """Blend ``predict``'s outputs over overlapping tiles into one ``(z, y, x, k)`` float32 array.

    Args:
        image: channels-last ``(z, y, x, c)`` volume (converted to float32). Axes shorter than the
            patch are zero-padded (image centred) and the output is cropped back.
        predict: maps ``(n, pz, py, px, c)`` float32 patches to ``(n, pz, py, px, k)``. It must not
            keep a reference to its input: the batch buffer is reused.
        config: how the window runs (:class:`WindowConfig`); default: ``WindowConfig()``.
        progress: called as ``progress(done, total)`` after every predictor call, in patches;
            ``total`` counts every test-time-augmentation pass.
        cancel: checked before every predictor call; when set, :class:`CancelledError` is raised.
        **fields: :class:`WindowConfig` fields by keyword (``patch_size=(16, 16, 16)``), replacing
            those of ``config``.

    Returns:
        The weighted average of the tiles' outputs at every voxel, float32 ``(z, y, x, k)``.
    """
    output: Optional[np.ndarray] = None
    for first, slab in iter_probability_slabs(image, predict, config, progress, cancel, **fields):
        if output is None:
            output = np.empty((np.shape(image)[0],) + slab.shape[1:], dtype=np.float32)
        output[first:first + slab.shape[0]] = slab
    if output is None:  # cannot happen: a validated image has at least one row, and each is yielded
        raise UNet3DSegmentError("internal error: the sliding window produced no output")
    return output
