"""The sliding window with blending on the model's device (the ``blend_on`` option's ``device``).

Same tiles, weights, test-time flips, progress and cancel as :func:`.window.iter_probability_slabs`,
but each batch goes to a :class:`~..runtime.device_blend.DeviceBlender`, which runs the model and adds
the weighted outputs into sums kept next to it; only the labelmap (and, when asked, the per-voxel
maximum probability and the probabilities) comes back. On a GPU this spares the per-batch copies and
the host-side blending, which otherwise take longer than the network.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from ..base.errors import BadInputError, CancelledError, OutOfMemoryError
from ..base.options import SegmentOptions
from ..runtime.device_blend import DeviceBlender, device_blender
from .blending import tile_weights
from .stages import assemble_batch, flip_sets
from .tiling import Start, empty_tiles, grid_starts, pad_to_patch, tile_units
from .window import ProgressCallback, WindowConfig, _resolve, _validate_image

# Makes the blender of a padded volume: (shape_zyx, tile weights, flips) -> DeviceBlender.
BlenderFactory = Callable[[tuple, np.ndarray, Sequence[tuple]], DeviceBlender]


class DeviceWindowResult(NamedTuple):
    """What :func:`device_sliding_window` copies back, on the image's grid (padding cropped off)."""

    labels: np.ndarray  # (z, y, x) uint8 (uint16 beyond 256 classes)
    probabilities: Optional[np.ndarray]  # (z, y, x, k) float32, only with keep_probabilities
    max_probability: Optional[np.ndarray]  # (z, y, x) float16, only with max_probability


def blend_on_device(choice: str, device: str) -> bool:
    """Whether ``blend_on`` (auto, host, device) blends on the device for a model running on ``device``.

    ``auto``: on the device when that is a GPU (``"gpu:N"``); on the CPU the host's slab ring uses less memory.
    """
    choice = SegmentOptions.spec("blend_on").check(choice)
    if choice == "auto":
        return str(device).startswith("gpu")
    return choice == "device"


def model_blender(model: Any, accumulation: str) -> BlenderFactory:
    """The factory of a ``LoadedModel``'s blenders (its backend, Keras model and class count)."""
    keras_model = getattr(model, "keras_model", None)
    if keras_model is None:
        raise BadInputError("blending on the device needs a loaded Keras model; use --blend-on host "
                            "(blend_on='host' from Python)")

    def make(shape: tuple, weights: np.ndarray, flips: Sequence[tuple]) -> DeviceBlender:
        return device_blender(model.backend, keras_model, shape, model.num_classes, weights, accumulation, flips)

    return make


def device_sliding_window(
    image: np.ndarray,
    make_blender: BlenderFactory,
    config: Optional[WindowConfig] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    keep_probabilities: bool = False,
    max_probability: bool = False,
    warn: Optional[Callable[[str], None]] = None,
    device: str = "the device",
    **fields: Any,
) -> DeviceWindowResult:
    """Segment ``image`` (channels-last ``(z, y, x, c)``) tile by tile, blending on the device.

    Tiling, padding (axes shorter than the patch, image centred, cropped back), weights and test-time
    flips are those of :func:`.window.sliding_window_predict`. ``progress(done, total)`` follows each
    batch once per flip, in patches; ``cancel`` is checked before and after every batch
    (:class:`CancelledError`). Tiles skipped as empty (``WindowConfig.skip_empty``) add one-hot
    background with their weights, are not counted, and come in the host's order
    (:func:`~.tiling.tile_units`), so that every voxel sums the same terms in the same order.

    Out of memory in the model halves the patches per call down to one, as on the host
    (``runtime/fallback.py``), each step told to ``warn`` (naming ``device``); beyond that, or out of
    memory while adding, :class:`OutOfMemoryError` is raised (the pipeline then blends on the host).
    """
    config = _resolve(config, fields)
    image = _validate_image(image, config.expected_channels)
    patch = config.patch_size
    flips = flip_sets(config.mirror_axes)
    padded, crop = pad_to_patch(image, patch)
    starts = grid_starts(padded.shape[:3], patch, config.overlap)
    empty = empty_tiles(padded, starts, patch) if config.skip_empty else [False] * len(starts)
    if all(empty):
        empty[0] = False  # as on the host: one tile runs
    total, done = (len(starts) - sum(empty)) * len(flips), 0

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise CancelledError(f"cancelled after {done} of {total} patches")

    def report(n: int) -> None:
        nonlocal done
        for _ in flips:  # one step per predictor call, as on the host
            done += n
            if progress is not None:
                progress(done, total)

    check_cancel()
    blender = make_blender(padded.shape[:3], tile_weights(patch, config.blend, config.accumulation), flips)
    limit: Optional[int] = None  # patches per model call after out-of-memory steps (None: the batch)
    for is_empty, batch_starts in tile_units(starts, empty, config.batch_size):
        if is_empty:
            blender.add_background(batch_starts)
            continue
        check_cancel()
        limit = _add_in_parts(blender, padded, batch_starts, patch, limit, warn or (lambda message: None), device)
        report(len(batch_starts))
        check_cancel()
    return DeviceWindowResult(
        labels=blender.labels(crop),
        probabilities=blender.probabilities(crop) if keep_probabilities else None,
        max_probability=blender.max_probability(crop) if max_probability else None,
    )


def _add_in_parts(blender: DeviceBlender, padded: np.ndarray, starts: Sequence[Start], patch: tuple,
                  limit: Optional[int], warn: Callable[[str], None], device: str) -> Optional[int]:
    """Add the tiles at ``starts`` in parts of at most ``limit``, halving it when the model runs out
    of memory (the sums are left as they were then). Returns the limit in effect afterwards."""
    pending = [list(starts)]
    while pending:
        part = pending.pop(0)
        if limit is not None and len(part) > limit:
            pending[:0] = [part[first:first + limit] for first in range(0, len(part), limit)]
            continue
        patches = assemble_batch(padded, part, patch, np.empty((len(part),) + patch + (padded.shape[3],), np.float32))
        try:
            blender.add_batch(patches, part)
        except OutOfMemoryError:
            if len(part) == 1 or not blender.intact:
                raise
            limit = len(part) // 2
            warn(f"out of memory on {device} with {len(part)} patches per model call; retrying with {limit}")
            pending.insert(0, part)
    return limit
