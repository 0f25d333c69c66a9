"""The whole segmentation job: input images and a model in, a labelmap on the input's grid out.

``segment_images`` works on in-memory SimpleITK images (used by the demo, the benchmark and tests);
``segment_files`` adds reading, early output-path checks and atomic writing (used by the command line,
and through it by the Slicer module and the web app). Both report progress as events (see
``engine/progress.py``) and stop between batches when ``cancel`` is set.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..base.errors import BadInputError
from ..base.options import SegmentOptions
from .progress import ProgressCallback, ProgressEmitter

PathLike = Union[str, Path]


@dataclass
class SegmentationResult:
    """What a run produced: the labelmap (input geometry), optional probabilities, and figures."""

    labels: Any  # SimpleITK.Image, uint8 labels on the input grid
    card: Any  # ModelCard used
    patches: int
    seconds: float
    probabilities: Optional[np.ndarray] = None  # (z, y, x, k) float32 on the input grid
    timings: dict[str, float] = field(default_factory=dict)
    output: Optional[Path] = None
    # One dict per non-background class (engine/statistics.py): label, name, voxels, volume_ml,
    # mean_/std_<channel>, confidence. The same figures go to --statistics and the done event.
    statistics: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # the input checks' warnings (engine/input_checks.py)


def card_overlap(card: Any) -> Any:
    """The overlap the model card recommends (its ``inference.overlap``), or None."""
    inference = getattr(card, "inference", None)
    return inference.overlap if inference is not None else None


def zero_means_background(card: Any) -> bool:
    """Whether an all-zero tile of the prepared input is certainly background for this card.

    True after ``zscore-nonzero`` (zeros stay 0 and are "no signal") or the crop to non-zero; not for
    ``none`` (0 HU is water) or ``window`` (0 is anything at or below the window's minimum), where
    ``skip_empty`` does not apply.
    """
    return card.input.normalization.method == "zscore-nonzero" or bool(card.input.crop_to_nonzero)


def _needs_resampling(card: Any) -> bool:
    return card.input.spacing != "native"


def _full_probabilities_fit(
    prepared: Any, classes: int, options: SegmentOptions, keep: bool, emitter: ProgressEmitter
) -> bool:
    """Whether the full probability arrays (working and input grid) fit ``options.max_memory``.

    When they do not: with ``keep`` (``--probabilities``) that is an error; otherwise a warning, and
    the labelmap is resampled as labels instead.
    """
    from ..base.units import format_size
    from .memory import budget_or_default, probability_bytes

    needed = probability_bytes(prepared.array.shape[:3], classes)
    needed += probability_bytes(tuple(reversed(prepared.original_image.GetSize())), classes)
    budget = budget_or_default(options.max_memory)
    if needed <= budget:
        return True
    if keep:
        raise BadInputError(
            f"writing probabilities needs {format_size(needed)} for them, above the memory budget of "
            f"{format_size(budget)}; raise --max-memory or leave out --probabilities"
        )
    emitter.emit(
        "warning",
        message=f"probabilities would need {format_size(needed)}, above the memory budget of "
        f"{format_size(budget)}: resampling the labelmap itself (nearest neighbour) instead",
    )
    return False


def _blend_on_device(
    array: np.ndarray, model: Any, options: SegmentOptions, window: Any, progress: Any,
    cancel: Optional[threading.Event], full: bool, emitter: ProgressEmitter,
) -> Optional[Any]:
    """The device path's ``DeviceWindowResult`` when ``options.blend_on`` picks it (``engine/device_window.py``),
    else None. Out of memory on the device: a warning, and None (the host path, with its own fallback)."""
    from ..base.errors import CancelledError, OutOfMemoryError
    from .device_window import blend_on_device, device_sliding_window, model_blender

    if not blend_on_device(options.blend_on, getattr(model, "device", "cpu")):
        return None
    try:
        return device_sliding_window(array, model_blender(model, options.accumulation), window, progress, cancel,
                                     keep_probabilities=full, max_probability=not full,
                                     warn=lambda message: emitter.emit("warning", message=message),
                                     device=getattr(model, "device", "cpu"))
    except OutOfMemoryError as error:
        emitter.emit("warning", message=f"{error}; blending on the host instead")
        return None
    except (BadInputError, CancelledError):
        raise
    except Exception as error:  # noqa: BLE001 - auto must not fail where the host path works
        if options.blend_on != "auto":
            raise
        emitter.emit("warning", message=f"blending on the device failed ({type(error).__name__}: "
                     f"{str(error).splitlines()[0] if str(error) else 'no message'}); blending on the host instead")
        return None


def segment_images(
    images: Sequence[Any],
    model: Any,
    options: SegmentOptions = SegmentOptions(),
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    keep_probabilities: bool = False,
    emitter: Optional[ProgressEmitter] = None,
    prefetch: bool = True,
) -> SegmentationResult:
    """Segment channel images (one ``SimpleITK.Image`` per card channel) with a ``LoadedModel``."""
    import SimpleITK as sitk

    from ..runtime.fallback import FallbackPredictor
    from .window import WindowConfig, iter_probability_slabs
    from .postprocessing import keep_largest_component, label_dtype, labels_from_probabilities
    from .preprocessing import prepare

    emitter = emitter or ProgressEmitter(progress)
    card = model.card
    if len(images) != model.in_channels:
        names = ", ".join(card.input.channels)
        raise BadInputError(
            f"model {card.name} takes {model.in_channels} input volume(s) ({names}), got {len(images)}; "
            "pass one volume per channel, in that order"
        )
    timings: dict[str, float] = {}

    from .input_checks import check_images

    input_warnings = check_images(list(images), card)  # never refuses: each mismatch is a warning
    for message in input_warnings:
        emitter.emit("warning", message=message, check="input")

    start = emitter.seconds
    emitter.emit("preprocess", message="reorienting, resampling, normalising")
    prepared = prepare(list(images), card)
    for message in prepared.warnings:  # e.g. non-finite voxels set to 0: counted, never silent
        emitter.emit("warning", message=message)
    timings["preprocess"] = emitter.seconds - start

    start = emitter.seconds
    counted: dict[str, int] = {"total": 0}

    def on_patches(done: int, total: int) -> None:
        counted["total"] = total
        emitter.patches(done, total)

    predictor = FallbackPredictor(
        model.predict,
        device=getattr(model, "device", "cpu"),
        cpu_fallback=getattr(model, "cpu_predictor", None),
        warn=lambda message: emitter.emit("warning", message=message),
    )
    window = WindowConfig.from_options(options, model.patch_size, prefetch=prefetch,
                                     recommended_overlap=card_overlap(card))
    if window.skip_empty and not zero_means_background(card):
        window = dataclasses.replace(window, skip_empty=False)
    full_needed = keep_probabilities or _needs_resampling(card)
    if full_needed:
        full_needed = _full_probabilities_fit(prepared, card.num_classes, options, keep_probabilities, emitter)
    on_device = _blend_on_device(prepared.array, model, options, window, on_patches, cancel, full_needed, emitter)
    if on_device is None:
        slabs = iter_probability_slabs(prepared.array, predictor, window, progress=on_patches, cancel=cancel)

    if full_needed:
        if on_device is not None:
            probabilities = on_device.probabilities
        else:
            probabilities = np.empty(prepared.array.shape[:3] + (card.num_classes,), dtype=np.float32)
            for first, slab in slabs:
                probabilities[first:first + slab.shape[0]] = slab
        timings["inference"] = emitter.seconds - start
        start = emitter.seconds
        emitter.emit("postprocess", message="labelmap on the input grid")
        # Resample probabilities (linear) rather than labels: smoother, more exact boundaries.
        full_probabilities = prepared.restore_probabilities(probabilities)
        del probabilities
        label_array = labels_from_probabilities(full_probabilities)
        if options.largest_component:
            label_array = keep_largest_component(label_array)
        labels = sitk.GetImageFromArray(label_array)
        labels.CopyInformation(prepared.original_image)
    else:
        full_probabilities = None
        if on_device is not None:
            label_array, own_probability = on_device.labels, on_device.max_probability
        else:
            label_array = np.empty(prepared.array.shape[:3], dtype=label_dtype(card.num_classes))
            # The probability of each voxel's label (its maximum), for the confidence in the statistics.
            own_probability = np.empty(prepared.array.shape[:3], dtype=np.float16)
            for first, slab in slabs:  # the labelmap is built slab by slab: no full probability array
                label_array[first:first + slab.shape[0]] = labels_from_probabilities(slab)
                own_probability[first:first + slab.shape[0]] = slab.max(axis=-1)
                del slab
        timings["inference"] = emitter.seconds - start
        start = emitter.seconds
        emitter.emit("postprocess", message="labelmap on the input grid")
        if options.largest_component:
            label_array = keep_largest_component(label_array)
        labels = prepared.restore_labels(label_array)
    timings["postprocess"] = emitter.seconds - start

    start = emitter.seconds
    from .statistics import compute_statistics

    statistics = compute_statistics(
        sitk.GetArrayViewFromImage(labels), labels.GetSpacing(), card,
        images=[sitk.GetArrayViewFromImage(image) for image in images], probabilities=full_probabilities)
    if full_probabilities is None:  # confidence on the working grid: the same voxels, reoriented or cropped
        confidence = compute_statistics(label_array, (1.0, 1.0, 1.0), card, probabilities=own_probability)
        del own_probability
        for row, other in zip(statistics, confidence):
            row["confidence"] = other["confidence"]
    timings["statistics"] = emitter.seconds - start
    return SegmentationResult(
        labels=labels,
        card=card,
        patches=counted["total"],
        seconds=emitter.seconds,
        probabilities=full_probabilities if keep_probabilities else None,
        timings=timings,
        statistics=statistics,
        warnings=input_warnings,
    )


def segment_files(
    inputs: Sequence[PathLike],
    output: PathLike,
    model: Optional[PathLike] = None,
    options: SegmentOptions = SegmentOptions(),
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    probabilities: Optional[PathLike] = None,
    overwrite: bool = False,
    loaded: Optional[Any] = None,
    statistics: Optional[PathLike] = None,
) -> SegmentationResult:
    """Read ``inputs`` (one file or DICOM folder per channel), segment, write ``output`` atomically.

    Output paths are checked before anything expensive runs. ``model=None`` uses the bundled demo
    model. ``loaded``: a ``LoadedModel`` already in memory (``unet3d-segment serve``), used instead of
    loading ``model``. Nothing is written unless the whole run succeeds.
    """
    from .bundled_models import default_model_path
    from .image_io import (
        check_output_path,
        labelmap_writer,
        probabilities_writer,
        read_channels,
        segmentation_writer,
        write_outputs,
    )
    from .loading import load_model

    emitter = ProgressEmitter(progress)
    if not inputs:
        raise BadInputError("no input volume given; pass at least one image file or DICOM folder")
    output_path = check_output_path(output, overwrite)
    probabilities_path = check_output_path(probabilities, overwrite) if probabilities else None
    if probabilities_path is not None and probabilities_path == output_path:
        raise BadInputError("--probabilities must name another file than the output")
    from .statistics import check_statistics_path, statistics_writer

    statistics_path = check_statistics_path(statistics, overwrite) if statistics else None
    if statistics_path is not None and statistics_path in (output_path, probabilities_path):
        raise BadInputError("--statistics must name another file than the other outputs")
    if probabilities_path is not None and probabilities_path.name.lower().endswith(".dcm"):
        raise BadInputError(f"probabilities cannot be written as DICOM ({probabilities_path}); use .nrrd or .nii.gz")
    dicom_source = None
    if output_path.name.lower().endswith(".dcm"):  # DICOM SEG: refuse a non-DICOM input before any work
        from .dicom_seg import check_dicom_input

        dicom_source = check_dicom_input(inputs)

    emitter.emit("load", message="reading input volume(s)")
    images = read_channels([Path(p) for p in inputs])
    if loaded is None:
        emitter.emit("load", message="loading model")
        loaded = load_model(Path(model) if model else default_model_path(), precision=options.precision)
    else:
        emitter.emit("load", message=f"model {loaded.path.name} already loaded")
    if loaded.precision != "fp32":
        emitter.emit("load", message=f"model runs in {loaded.precision} mixed precision on {loaded.device}")

    result = segment_images(
        images,
        loaded,
        options,
        cancel=cancel,
        keep_probabilities=probabilities_path is not None,
        emitter=emitter,
    )
    if cancel is not None and cancel.is_set():
        from ..base.errors import CancelledError

        raise CancelledError("cancelled before writing; nothing was written")

    emitter.emit("write", message=f"writing {output_path.name}")
    # Both outputs or neither: each is written to a temporary file, then both are renamed into place;
    # if the second rename fails the first is put back (write_outputs). SIGTERM while writing cancels
    # before the renames (exit 5, nothing replaced).
    outputs = []
    if probabilities_path is not None:
        outputs.append((probabilities_path,
                        probabilities_writer(result.probabilities, result.labels, probabilities_path)))
    if dicom_source is not None:
        from .dicom_seg import dicom_seg_writer

        outputs.append((output_path, dicom_seg_writer(result.labels, dicom_source, output_path, result.card)))
    elif output_path.name.lower().endswith(".seg.nrrd"):
        classes = [
            (c.name, c.rgb01, c.terminology.to_slicer_string() if c.terminology else None)
            for c in result.card.classes
        ]
        outputs.append((output_path, segmentation_writer(result.labels, output_path, classes)))
    else:
        outputs.append((output_path, labelmap_writer(result.labels)))
    if statistics_path is not None:  # written with the other outputs: all of them or none
        outputs.append((statistics_path, statistics_writer(result.statistics, statistics_path)))
    write_outputs(outputs, overwrite, cancel=cancel)
    result.output = output_path
    extra = {"statistics_file": str(statistics_path)} if statistics_path is not None else {}
    emitter.emit("done", message=f"wrote {output_path}", output=str(output_path), patches=result.patches,
                 statistics=result.statistics, warnings=result.warnings, **extra)
    return result
