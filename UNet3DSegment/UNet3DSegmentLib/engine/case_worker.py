"""One case of a cohort, the same in every engine of ``unet3d-segment batch``: read, segment, write, figures.

:class:`CaseWorker` holds one loaded model; the local engine (``engine/cohort.py``) runs it in its own
process or in worker processes, the Ray engine (``engine/ray_engine.py``) as an actor. Because every
engine runs this code, their labelmaps and figures are the same voxel for voxel.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..base.errors import CancelledError, UNet3DSegmentError, is_out_of_memory
from ..base.options import SegmentOptions
from .cases import Case

CONFIDENCE_COLUMN = "confidence"
WARNINGS_COLUMN = "warnings"  # the input checks' warnings of a case, " | " between them, one line
Row = dict


def volume_column(class_name: str) -> str:
    """The results.csv column of one class's volume: ``"CSF [mL]"``."""
    return f"{class_name} [mL]"


def output_name(case: Case, fmt: str) -> str:
    """``<case>.<format>``; the ``dicom-seg`` format is ``<case>.dcm``."""
    return f"{case.name}.{'dcm' if fmt == 'dicom-seg' else fmt}"


def start_runtime(options: SegmentOptions) -> str:
    """Choose the Keras backend and configure its device for this process (before Keras loads)."""
    from ..runtime.backends import backend_installed, configure_runtime, select_backend

    select_backend(options.backend, options.device, options.gpu_index, options.gpu_memory_limit)
    if backend_installed("tensorflow"):
        from ..runtime.tensorflow_setup import import_tensorflow_quietly

        import_tensorflow_quietly()
    return configure_runtime(options.device, threads=options.threads, gpu_index=options.gpu_index,
                             gpu_memory_limit=options.gpu_memory_limit)


class CaseWorker:
    """One loaded model and the steps of one case: read, segment, write, figures. Same in every engine.

    ``argv`` is ``SegmentOptions.to_argv()`` of the run (the options travel to worker processes and
    Ray actors as flags, read back with the declarations).
    """

    def __init__(self, model: Optional[str], argv: Sequence[str], outdir: str, fmt: str, overwrite: bool,
                 start: bool = True) -> None:
        from .bundled_models import default_model_path
        from .loading import load_model, trust_models

        self.options = options_from_argv(argv)
        self.outdir = Path(outdir)
        self.fmt = fmt
        self.overwrite = overwrite
        self.cancel_event = threading.Event()
        trust_models(self.options.trust_model)
        if start:
            start_runtime(self.options)
        self.loaded = load_model(Path(model) if model else default_model_path(), precision=self.options.precision)

    def pid(self) -> int:
        return os.getpid()

    def cancel(self) -> None:
        self.cancel_event.set()

    def run(self, case: Case, images: Any = None, cancel: Optional[Any] = None) -> Row:
        """Segment one case; returns its results row (errors become an ``error`` row, never raised).

        ``images``: the case's channels already read (or the exception reading them raised).
        Cancel raises :class:`CancelledError` (the case is not done and gets no row).
        """
        cancel = cancel if cancel is not None else self.cancel_event
        started = time.perf_counter()
        output = self.outdir / output_name(case, self.fmt)
        row: Row = {"case": case.name, "status": "ok", "output": str(output), "message": ""}
        try:
            if isinstance(images, BaseException):
                raise images
            row.update(self._segment(case, output, images, cancel))
        except CancelledError:
            raise
        except KeyboardInterrupt as error:
            raise CancelledError("interrupted") from error
        except Exception as error:  # noqa: BLE001 - one bad case never stops the others
            if cancel is not None and cancel.is_set():
                raise CancelledError("cancelled") from error
            row.update(status="error", output="", message=describe_failure(error))
        row["seconds"] = round(time.perf_counter() - started + getattr(images, "read_seconds", 0.0), 3)
        return row

    def _segment(self, case: Case, output: Path, images: Any, cancel: Any) -> Row:
        from .image_io import check_output_path, read_channels
        from .pipeline import segment_images

        overwrite = self.overwrite or case.replace  # resume: a recomputed case replaces its own output
        output = check_output_path(output, overwrite)
        dicom_source = None
        if output.name.lower().endswith(".dcm"):  # DICOM SEG: a non-DICOM case fails before any work
            from .dicom_seg import check_dicom_input

            dicom_source = check_dicom_input(list(case.paths))
        if images is None:
            images = read_channels(list(case.paths))
        result = segment_images(list(images), self.loaded, self.options, cancel=cancel)
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled before writing; nothing was written")
        write_result(result, output, overwrite, cancel, dicom_source)
        figures = case_figures(result)
        figures[WARNINGS_COLUMN] = " | ".join(" ".join(str(w).split()) for w in getattr(result, "warnings", None) or [])
        return figures


def case_figures(result: Any) -> Row:
    """The volume of each class (``<class> [mL]``) and the case's confidence, from the pipeline's statistics.

    ``engine/statistics.py`` gives per class the voxel count x voxel volume and the mean probability
    of the voxels' own label (their max-probability, gathered from the blended slabs at no extra cost);
    the case's confidence is the voxel-weighted mean over the foreground classes (empty: no foreground).
    """
    rows = list(getattr(result, "statistics", None) or [])
    if not rows:  # a pipeline without statistics: volumes from the labelmap, no confidence
        import SimpleITK as sitk

        from .statistics import compute_statistics

        rows = compute_statistics(sitk.GetArrayViewFromImage(result.labels), result.labels.GetSpacing(), result.card)
    figures: Row = {volume_column(r["name"]): r["volume_ml"] for r in rows}
    weighed = [(r["confidence"], r["voxels"]) for r in rows if r.get("confidence") is not None and r["voxels"]]
    voxels = sum(n for _, n in weighed)
    figures[CONFIDENCE_COLUMN] = sum(c * n for c, n in weighed) / voxels if voxels else None
    return figures


def options_from_argv(argv: Sequence[str]) -> SegmentOptions:
    """``SegmentOptions`` from the flags ``to_argv`` wrote (the declarations parse them)."""
    values: dict[str, Any] = {}
    by_flag = {o.cli_flag: o for o in SegmentOptions.options()}
    items = list(argv)
    index = 0
    while index < len(items):
        declared = by_flag[items[index]]
        if declared.kind is bool:
            values[declared.name] = not declared.default
            index += 1
        else:
            values[declared.name] = declared.parse(items[index + 1])
            index += 2
    return SegmentOptions.from_values(values)


def write_result(result: Any, output: Path, overwrite: bool, cancel: Any, dicom_source: Any = None) -> None:
    """Write the labelmap as ``segment`` does (a DICOM SEG referencing ``dicom_source``, ``.seg.nrrd``
    with the card's segments, else a labelmap)."""
    from .image_io import labelmap_writer, segmentation_writer, write_outputs

    if dicom_source is not None:
        from .dicom_seg import dicom_seg_writer

        writer = dicom_seg_writer(result.labels, dicom_source, output, result.card)
    elif output.name.lower().endswith(".seg.nrrd"):
        classes = [(c.name, c.rgb01, c.terminology.to_slicer_string() if c.terminology else None)
                   for c in result.card.classes]
        writer = segmentation_writer(result.labels, output, classes)
    else:
        writer = labelmap_writer(result.labels)
    write_outputs([(output, writer)], overwrite, cancel=cancel)


def describe_failure(error: BaseException) -> str:
    """One line for a failed case's row."""
    if isinstance(error, UNet3DSegmentError):
        text = f"{error.kind}: {error}"
    elif is_out_of_memory(error):
        text = f"out-of-memory: {type(error).__name__}: {error}"
    else:
        text = f"internal: unexpected {type(error).__name__}: {error}"
    return " ".join(text.split())[:500]
