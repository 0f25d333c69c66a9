"""Read input volumes and write results, with SimpleITK only.

Inputs: NRRD, NIfTI, MetaImage files or a folder holding one DICOM series; several files are
several channels and must share one voxel grid. Headers are checked before the voxels are read
(truncated NIfTI, sizes beyond this machine's memory). Outputs are written to hidden temporary files
(``.<name>.tmp-<pid>-<random><ext>``) in the destination folder and renamed into place, all outputs
of a run together (:func:`write_outputs`), so a cancelled or failed run never leaves a half-written
file, never leaves one output without the other and never replaces an existing file unless asked to;
temporaries of runs that died are removed by later writes to the same folder.

Segmentations can be written as Slicer's ``.seg.nrrd``: one labelmap layer plus the NRRD key/value
fields that Slicer's ``vtkMRMLSegmentationStorageNode`` reads (``Segment{i}_ID``, ``_Name``,
``_Color``, ``_LabelValue``, ``_Layer``, ``_Extent``, ``_Tags``, ...), so Slicer opens the file as a
segmentation with named, coloured segments and terminology.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import secrets
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..base.errors import (
    BadInputError,
    BadModelError,
    CancelledError,
    OutOfMemoryError,
    UNet3DSegmentError,
    is_out_of_memory,
)

PathLike = Union[str, os.PathLike]
# (name, (r, g, b) in [0, 1], Slicer terminology entry string or None); index i is label value i.
SegmentClass = Tuple[str, Sequence[float], Optional[str]]

INPUT_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
# Longest first, so that ".seg.nrrd" wins over ".nrrd" and ".nii.gz" over ".gz".
# ".dcm": a DICOM SEG, written by engine/dicom_seg.py (DICOM input only; engine/pipeline.py routes it).
OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".dcm")
GRID_TOLERANCE = 1e-4  # relative tolerance when comparing the grids of channels

_INPUT_HINT = "use NRRD (.nrrd/.nhdr), NIfTI (.nii/.nii.gz), MetaImage (.mha/.mhd) or a DICOM folder"


def path_suffix(path: PathLike, known: Sequence[str]) -> str:
    """The longest of ``known`` that ends the file name (case-insensitive), or the last suffix."""
    name = Path(path).name.lower()
    for suffix in sorted(known, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return Path(name).suffix


# ----------------------------------------------------------------------------------------- reading
@contextlib.contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """ITK's multi-line warning blocks (e.g. GDCM's "No Series were found") off while reading: the
    engine says what is wrong in one line itself. The previous setting is restored afterwards."""
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def read_image(path: PathLike) -> sitk.Image:
    """Read one scalar 3-D volume from an image file or a folder holding one DICOM series.

    The header is read first: 4-D/vector files, files whose voxel data is shorter than the header
    claims (truncated NIfTI, which ITK would pad with zeros) and volumes larger than this machine's
    memory are refused before any voxel is read.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"input {path} does not exist; check the path")
    if path.is_dir():
        with _itk_warnings_off():
            image = _read_dicom_folder(path)
    else:
        suffix = path_suffix(path, INPUT_SUFFIXES)
        if suffix not in INPUT_SUFFIXES:
            raise BadInputError(f"input {path} has the unsupported extension '{suffix}'; {_INPUT_HINT}")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            with _itk_warnings_off():
                reader.ReadImageInformation()  # header only: reject 4-D/vector files before the pixels
                _check_scalar_3d(path, reader.GetDimension(), reader.GetSize(),
                                 reader.GetNumberOfComponents())
                _check_claimed_size(path, suffix, reader)
                image = reader.Execute()
        except RuntimeError as error:
            if is_out_of_memory(error):
                raise OutOfMemoryError(
                    f"out of memory reading {path} ({'x'.join(map(str, reader.GetSize()))} voxels); close other "
                    f"programs, or crop or downsample the volume"
                ) from error
            raise BadInputError(
                f"cannot read {path}: {_first_line(error)}; check that it is a valid, complete "
                f"image file ({_INPUT_HINT})"
            ) from error
    _check_scalar_3d(path, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
    if image.GetDimension() == 4:  # 4-D with a single time point: keep the 3-D volume
        image = image[:, :, :, 0]
    return image


def _read_dicom_folder(folder: Path) -> sitk.Image:
    """Read the only DICOM series in ``folder`` with GDCM (files sorted by slice position)."""
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise BadInputError(
            f"input folder {folder} holds no DICOM series; pass a folder of DICOM files or an "
            f"image file ({_INPUT_HINT})"
        )
    if len(series_ids) > 1:
        raise BadInputError(
            f"input folder {folder} holds {len(series_ids)} DICOM series ({', '.join(series_ids)}); "
            f"pass one folder per series"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise BadInputError(
            f"cannot read the DICOM series in {folder}: {_first_line(error)}; check that the "
            f"files are complete and hold one volume"
        ) from error


def _check_scalar_3d(path: Path, dimension: int, size: Sequence[int], components: int) -> None:
    """Reject anything but a scalar 3-D volume (4-D with one time point is accepted)."""
    if components != 1:
        raise BadInputError(
            f"input {path} has {components} components per voxel (a vector or colour image); the "
            f"model needs scalar volumes: save each component as its own 3-D file and pass the "
            f"files as separate channels"
        )
    if dimension == 4 and size[3] == 1:
        return
    if dimension == 4:
        raise BadInputError(
            f"input {path} is 4-D (size {tuple(size)}), e.g. a time series or stacked channels; "
            f"the model needs 3-D volumes: split it into one 3-D file per volume and pass those "
            f"as the channels"
        )
    if dimension != 3:
        raise BadInputError(
            f"input {path} is {dimension}-D (size {tuple(size)}); the model needs a 3-D volume"
        )


def _check_claimed_size(path: Path, suffix: str, reader: sitk.ImageFileReader) -> None:
    """Compare the voxel data a header claims with what the file holds and what this machine has.

    NIfTI (``.nii``, ``.nii.gz``): ITK reads a short file without an error and fills the missing
    voxels with zeros, so the data is measured here: the file size of a ``.nii``, the length of the
    decompressed stream of a ``.nii.gz`` (streamed: nothing of the claimed size is allocated; a
    gzip stream cut short is caught too). Other formats: ITK itself refuses short data.
    """
    from ..base.units import format_size
    from ..runtime.cpu import total_memory

    size = tuple(int(n) for n in reader.GetSize())
    component_bytes = sitk.Image([1] * len(size), reader.GetPixelID()).GetSizeOfPixelComponent()
    claimed = math.prod(size) * reader.GetNumberOfComponents() * component_bytes
    shape = "x".join(map(str, size[:3])) + ("" if len(size) == 3 else "x" + "x".join(map(str, size[3:])))
    if suffix in (".nii", ".nii.gz"):
        holds, offset, stored = _nifti_data_bytes(path)
        # What the file must hold is the header's own count (dims x bitpix): with scl_slope ITK reports
        # float voxels while the file stores, say, int16.
        stored = claimed if stored is None else stored
        if holds < stored:
            raise BadInputError(
                f"input {path} is truncated: its header claims {shape} voxels ({stored} bytes) but the file "
                f"holds {max(0, holds)} bytes of voxel data after the {offset}-byte header; copy or export it again"
            )
    memory = total_memory()
    if memory and claimed > memory:
        raise OutOfMemoryError(
            f"input {path} needs {format_size(claimed)} for its {shape} voxels, more than this machine's "
            f"memory ({format_size(memory)}); check the file's header, or crop or downsample the volume"
        )


def _nifti_data_bytes(path: Path) -> Tuple[int, int, Optional[int]]:
    """(bytes of voxel data the NIfTI file holds, header size, bytes its header says it stores), reading a
    ``.gz`` as a stream; the last is None for a header this does not know.

    A gzip stream that ends early or fails its checksum is a truncated file (``BadInputError``).
    """
    chunk = 1 << 20
    if _head(path, 2) == b"\x1f\x8b":  # gzip magic: a .nii.gz (whatever the name says)
        total, head = 0, b""
        try:
            with gzip.open(path, "rb") as stream:
                while True:
                    block = stream.read(chunk)
                    if not block:
                        break
                    if len(head) < 544:
                        head += block[: 544 - len(head)]
                    total += len(block)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as error:
            raise BadInputError(
                f"input {path} is truncated or damaged: its compressed data {_gzip_problem(error)}; copy or "
                f"export it again"
            ) from error
    else:
        head, total = _head(path, 544), path.stat().st_size
    offset = _nifti_vox_offset(head)
    return total - offset, offset, _nifti_stored_bytes(head)


def _nifti_stored_bytes(head: bytes) -> Optional[int]:
    """Voxel bytes a NIfTI header declares: product of its dims times ``bitpix`` / 8 (NIfTI-1 or -2)."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack_from(endian + "i", head, 0)[0] == 348:
            dims = struct.unpack_from(endian + "8h", head, 40)
            bitpix = struct.unpack_from(endian + "h", head, 72)[0]
        elif len(head) >= 540 and struct.unpack_from(endian + "i", head, 0)[0] == 540:
            dims = struct.unpack_from(endian + "8q", head, 16)
            bitpix = struct.unpack_from(endian + "h", head, 14)[0]
        else:
            continue
        if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1:dims[0] + 1]):
            return None
        return math.prod(dims[1:dims[0] + 1]) * bitpix // 8
    return None


def _head(path: Path, count: int) -> bytes:
    with open(path, "rb") as stream:
        return stream.read(count)


def _gzip_problem(error: BaseException) -> str:
    if isinstance(error, EOFError):
        return "ends before its end marker"
    return f"is invalid ({_first_line(error)})"


def _nifti_vox_offset(head: bytes) -> int:
    """Where the voxel data starts (NIfTI-1: float at byte 108; NIfTI-2: int64 at byte 168)."""
    for endian in "<>":
        if len(head) >= 112 and struct.unpack_from(endian + "i", head, 0)[0] == 348:
            return max(348, int(struct.unpack_from(endian + "f", head, 108)[0]))
        if len(head) >= 176 and struct.unpack_from(endian + "i", head, 0)[0] == 540:
            return max(540, int(struct.unpack_from(endian + "q", head, 168)[0]))
    return 0  # not a header we know: ITK will say what is wrong


def read_channels(paths: Sequence[PathLike]) -> list[sitk.Image]:
    """Read one file per channel; all channels must lie on the first one's voxel grid.

    Grids are compared with a relative tolerance of ``GRID_TOLERANCE`` (origins relative to the
    voxel size); channels within it get the first channel's exact geometry.
    """
    if not paths:
        raise BadInputError("no input volume given; pass at least one image file or DICOM folder")
    images = [read_image(path) for path in paths]
    first = images[0]
    for path, image in zip(paths[1:], images[1:]):
        problem = _grid_difference(image, first)
        if problem is not None:
            name, value, reference = problem
            raise BadInputError(
                f"channel {path} does not lie on the grid of channel {paths[0]}: {name} "
                f"{_fmt(value)} vs {_fmt(reference)}; resample it onto the first channel's grid "
                f"(e.g. Slicer's Resample Scalar/Vector/DWI Volume) or pass matching files"
            )
        image.CopyInformation(first)
    return images


def _grid_difference(image: sitk.Image, reference: sitk.Image) -> Optional[tuple]:
    """(property, value, reference value) of the first grid property that differs, else None."""
    if image.GetSize() != reference.GetSize():
        return "size", image.GetSize(), reference.GetSize()
    spacing, ref_spacing = np.array(image.GetSpacing()), np.array(reference.GetSpacing())
    if np.any(np.abs(spacing - ref_spacing) > GRID_TOLERANCE * np.abs(ref_spacing)):
        return "spacing", image.GetSpacing(), reference.GetSpacing()
    origin_tolerance = GRID_TOLERANCE * max(1.0, float(ref_spacing.max()))
    if np.any(np.abs(np.subtract(image.GetOrigin(), reference.GetOrigin())) > origin_tolerance):
        return "origin", image.GetOrigin(), reference.GetOrigin()
    if np.any(np.abs(np.subtract(image.GetDirection(), reference.GetDirection())) > GRID_TOLERANCE):
        return "direction", image.GetDirection(), reference.GetDirection()
    return None


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _first_line(error: BaseException) -> str:
    """The informative part of a SimpleITK/ITK exception: its last non-empty line, shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text[:300]


# ----------------------------------------------------------------------------------------- writing
def check_output_path(path: PathLike, overwrite: bool) -> Path:
    """Fail early (before inference) if ``path`` cannot be written; return it made absolute."""
    path = Path(path).expanduser().absolute()
    suffix = path_suffix(path, OUTPUT_SUFFIXES)
    if suffix not in OUTPUT_SUFFIXES:
        raise BadInputError(
            f"output {path} has the unsupported extension '{suffix}'; use one of "
            f"{', '.join(OUTPUT_SUFFIXES)}"
        )
    check_destination(path, "output", overwrite, "segmentation.nrrd")
    return path


def check_destination(path: Path, what: str, overwrite: bool, example: str) -> None:
    """One-line ``BadInputError`` unless ``path`` can be written: its folder exists and is writable, it is
    not a folder, and it is new or ``overwrite`` allows replacing it. ``what`` names it in the message."""
    folder = path.parent
    if not folder.is_dir():
        raise BadInputError(f"{what} folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"{what} folder {folder} is not writable; choose another folder")
    if path.is_dir():
        raise BadInputError(f"{what} {path} is a folder; give a file name such as {path / example}")
    if path.exists() and not overwrite:
        raise BadInputError(f"{what} {path} exists; pass --overwrite to replace it or choose another path")


Writer = Callable[[Path], None]
STALE_TEMPORARY_SECONDS = 60.0  # a dead run's temporary file older than this is removed
# ".<stem>.tmp-<pid>-<8 hex><suffix>": the temporaries (and backups) this module makes.
_TEMPORARY_NAME = re.compile(r"^\..+\.tmp-(?P<pid>[0-9]+)-[0-9a-f]{8}(\..*)?$")


def temporary_path(path: Path) -> Path:
    """A hidden file name beside ``path`` with this process's id and the destination's extension
    (so SimpleITK picks the format): ``.<stem>.tmp-<pid>-<random><suffix>``."""
    suffix = path_suffix(path, OUTPUT_SUFFIXES)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def remove_stale_temporaries(folder: PathLike, older_than: float = STALE_TEMPORARY_SECONDS) -> list[Path]:
    """Remove the temporary files of runs that died (``kill -9``, power loss) from ``folder``.

    Only plain files named as :func:`temporary_path` names them, whose process is gone and which
    were last modified more than ``older_than`` seconds ago; anything else is left alone. Returns
    the files removed. (A run on another machine writing to a shared folder keeps its file fresh
    while it writes; one that stalls for a minute may lose its temporary and then fails cleanly.)
    """
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY_NAME.match(entry.name)
        if match is None or int(match["pid"]) == os.getpid() or _process_alive(int(match["pid"])):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or now - entry.stat().st_mtime < older_than:
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def _process_alive(pid: int) -> bool:
    """Whether a process with this id exists (True when that cannot be told: keep its files)."""
    if pid <= 0:
        return True
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _windows_process_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process
    try:
        code = ctypes.c_ulong()
        if kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return code.value == 259  # STILL_ACTIVE
        return True
    finally:
        kernel32.CloseHandle(handle)


def atomic_write(path: PathLike, writer: Writer, overwrite: bool) -> Path:
    """Let ``writer`` write a hidden temporary file beside ``path``, then rename it into place.

    The temporary file keeps the destination's extension so SimpleITK picks the right file
    format. It is removed on any exception, KeyboardInterrupt and cancellation included. Without
    ``overwrite`` an existing file is never replaced, even one that appeared during the write.
    """
    return write_outputs([(path, writer)], overwrite)[0]


def write_outputs(
    outputs: Sequence[Tuple[PathLike, Writer]],
    overwrite: bool,
    cancel: Optional[threading.Event] = None,
) -> list[Path]:
    """Write several outputs as one: every file or none of them, old files kept on any failure.

    1. Stale temporaries of dead runs are removed from the destination folders.
    2. Each ``writer`` writes its hidden temporary file (:func:`temporary_path`).
    3. If ``cancel`` is set by then (SIGTERM during writing), the temporaries are removed and
       ``CancelledError`` is raised: nothing is replaced.
    4. The temporaries are renamed into place in order; an existing file is first kept as a hidden
       backup (a hard link where the file system has them). If a later rename fails, the outputs
       already renamed are put back (their backups restored, new files removed) and the error
       is raised as ``BadInputError``.
    Without ``overwrite`` an existing file is never replaced, even one that appeared meanwhile.
    """
    targets = [Path(path).absolute() for path, _ in outputs]
    for path in targets:
        if path.exists() and not overwrite:
            raise BadInputError(f"output {path} exists; pass --overwrite to replace it or choose another path")
    for folder in dict.fromkeys(path.parent for path in targets):
        remove_stale_temporaries(folder)
    temps: list[Path] = []
    committed: list[Tuple[Path, Optional[Path]]] = []  # (output, its backup or None when it is new)
    kept: list[Path] = []  # backups that could not be put back: never deleted
    try:
        for path, (_, writer) in zip(targets, outputs):
            if cancel is not None and cancel.is_set():
                break
            temps.append(temporary_path(path))
            try:
                writer(temps[-1])
            except (RuntimeError, OSError) as error:
                raise BadInputError(
                    f"cannot write {path}: {_first_line(error)}; check free disk space and permissions"
                ) from error
            if not temps[-1].is_file():
                raise UNet3DSegmentError(f"internal error: the writer of {path} produced no file")
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled while writing the outputs; nothing was written or replaced")
        try:
            for path, temp in zip(targets, temps):
                committed.append((path, _commit(temp, path, overwrite)))
        except BaseException as error:
            kept = _roll_back(committed)
            committed = []
            if isinstance(error, OSError):
                note = f" (the old file is kept as {', '.join(map(str, kept))})" if kept else ""
                raise BadInputError(
                    f"cannot write {path}: {_first_line(error)}; no output was changed{note}; check free "
                    f"disk space and permissions"
                ) from error
            raise
    finally:
        for temp in temps:
            if temp.exists():
                temp.unlink()
        for _, backup in committed:
            if backup is not None and backup not in kept:
                backup.unlink(missing_ok=True)
    return targets


def _commit(temp: Path, path: Path, overwrite: bool) -> Optional[Path]:
    """Rename ``temp`` to ``path``; returns the backup of the file it replaced (None: there was none)."""
    if not overwrite:
        _move_without_replacing(temp, path)
        return None
    if not path.exists():
        os.replace(temp, path)
        return None
    backup = temporary_path(path)
    try:
        os.link(path, backup)  # the old file stays in place until the atomic replace
        linked = True
    except OSError:  # no hard links here: move it aside (the output is missing for a moment)
        os.replace(path, backup)
        linked = False
    try:
        os.replace(temp, path)
    except BaseException:
        if linked:
            backup.unlink(missing_ok=True)
        else:
            os.replace(backup, path)
        raise
    return backup


def _roll_back(committed: Sequence[Tuple[Path, Optional[Path]]]) -> list[Path]:
    """Undo renamed outputs: restore backups, remove new files. Returns backups it could not restore."""
    kept = []
    for path, backup in reversed(committed):
        try:
            if backup is None:
                path.unlink(missing_ok=True)
            else:
                os.replace(backup, path)
        except OSError:
            if backup is not None:
                kept.append(backup)
    return kept


def _move_without_replacing(temp: Path, path: Path) -> None:
    """Rename ``temp`` to ``path`` unless ``path`` exists (atomic through a hard link if possible)."""
    try:
        os.link(temp, path)  # fails with FileExistsError instead of replacing
    except FileExistsError as error:
        raise BadInputError(
            f"output {path} exists; pass --overwrite to replace it or choose another path"
        ) from error
    except OSError:  # no hard links on this file system: check, then rename
        if path.exists():
            raise BadInputError(
                f"output {path} exists; pass --overwrite to replace it or choose another path"
            ) from None
        os.replace(temp, path)
    else:
        temp.unlink()


def write_labelmap(label_image: sitk.Image, path: PathLike, overwrite: bool = False) -> Path:
    """Write a label image (compressed) as the smallest unsigned integer type that holds it."""
    if path_suffix(path, OUTPUT_SUFFIXES) == ".dcm":  # not a DICOM image of labels: a DICOM SEG
        raise BadInputError(f"{path} asks for a DICOM SEG; write it with engine.dicom_seg.write_dicom_seg")
    return atomic_write(path, labelmap_writer(label_image), overwrite)


def labelmap_writer(label_image: sitk.Image) -> Writer:
    """The writer (for :func:`write_outputs`) of :func:`write_labelmap`; checks the labels now."""
    labels = _as_label_image(label_image)
    return lambda temp: sitk.WriteImage(labels, str(temp), True)


def write_segmentation(
    label_image: sitk.Image,
    path: PathLike,
    classes: Sequence[SegmentClass],
    overwrite: bool = False,
) -> Path:
    """Write a label image as a Slicer ``.seg.nrrd``: one segment per class with index >= 1.

    ``classes[i]`` describes label value ``i``: (name, rgb colour in [0, 1], terminology entry
    string as Slicer stores it, or None). Class 0 is the background and gets no segment; every
    other class gets one, even when it is empty.
    """
    return atomic_write(path, segmentation_writer(label_image, path, classes), overwrite)


def segmentation_writer(label_image: sitk.Image, path: PathLike, classes: Sequence[SegmentClass]) -> Writer:
    """The writer (for :func:`write_outputs`) of :func:`write_segmentation`; checks everything now."""
    if path_suffix(path, OUTPUT_SUFFIXES) != ".seg.nrrd":
        raise BadInputError(f"segmentation output {path} must end in .seg.nrrd; rename it")
    labels = _as_label_image(label_image)
    highest = int(sitk.GetArrayViewFromImage(labels).max(initial=0))
    if highest >= len(classes):
        raise BadModelError(
            f"the label image holds label {highest} but only {len(classes)} classes are named; "
            f"give the model card one class per output channel"
        )
    if labels is label_image:  # own copy: the metadata must not leak into the caller's image
        labels = sitk.Image(labels)
    for key, value in segmentation_metadata(labels, classes).items():
        labels.SetMetaData(key, value)
    return lambda temp: sitk.WriteImage(labels, str(temp), True)


def segmentation_metadata(reference: sitk.Image, classes: Sequence[SegmentClass]) -> dict[str, str]:
    """The NRRD key/value fields of a one-layer Slicer segmentation on ``reference``'s grid.

    Every segment gets the full extent: Slicer builds a layer's labelmap from the extent of the
    layer's first segment, so a smaller (or empty) first extent would crop the other segments.
    """
    size = reference.GetSize()
    extent = f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}"
    fields = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": (
            "Reference image geometry|" + _slicer_image_geometry(reference)
            + "|Image geometry description string determining the geometry of the labelmap that "
            "is created in course of conversion.&"
        ),
    }
    for index, (name, color, terminology) in enumerate(classes[1:]):
        label_value = index + 1
        _check_class(label_value, name, color, terminology)
        prefix = f"Segment{index}_"
        fields[prefix + "ID"] = f"Segment_{label_value}"
        fields[prefix + "Name"] = name
        fields[prefix + "NameAutoGenerated"] = "0"
        fields[prefix + "Color"] = " ".join(f"{float(c):.6g}" for c in color)
        fields[prefix + "ColorAutoGenerated"] = "0"
        fields[prefix + "LabelValue"] = str(label_value)
        fields[prefix + "Layer"] = "0"
        fields[prefix + "Extent"] = extent
        fields[prefix + "Tags"] = f"TerminologyEntry:{terminology}|" if terminology else "|"
    return fields


def _check_class(label_value: int, name: str, color: Sequence[float], terminology: Optional[str]) -> None:
    """Reject class descriptions that would break the NRRD header or Slicer's tag parsing."""
    if not name or any(ch in name for ch in "\r\n"):
        raise BadModelError(f"class {label_value} has an empty or multi-line name {name!r}; fix the model card")
    if len(color) != 3 or not all(0.0 <= float(c) <= 1.0 for c in color):
        raise BadModelError(
            f"class {label_value} ({name}) has colour {tuple(color)}; give three values in [0, 1]"
        )
    if terminology is not None and any(ch in terminology for ch in "|\r\n"):
        raise BadModelError(
            f"class {label_value} ({name}) has a terminology entry containing '|' or a line break; "
            f"fix the model card"
        )


def _slicer_image_geometry(image: sitk.Image) -> str:
    """Slicer's serialised image geometry: IJK-to-RAS matrix (row-major) then the extent."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ijk_to_ras = np.eye(4)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    ijk_to_ras[:3, :3] = lps_to_ras @ direction @ np.diag(image.GetSpacing())
    ijk_to_ras[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    size = image.GetSize()
    values = [repr(float(v)) for v in ijk_to_ras.flatten()]
    values += [str(v) for axis in range(3) for v in (0, size[axis] - 1)]
    return ";".join(values) + ";"


def _as_label_image(label_image: sitk.Image) -> sitk.Image:
    """Check a 3-D scalar label image and cast it to UInt8 (or UInt16 when labels exceed 255)."""
    if label_image.GetDimension() != 3 or label_image.GetNumberOfComponentsPerPixel() != 1:
        raise BadInputError(
            f"a label image must be scalar 3-D, got {label_image.GetDimension()}-D with "
            f"{label_image.GetNumberOfComponentsPerPixel()} components"
        )
    values = sitk.GetArrayViewFromImage(label_image)
    if not np.issubdtype(values.dtype, np.integer):
        raise BadInputError(f"a label image must have an integer pixel type, got {values.dtype}")
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise BadInputError(f"label values must lie in 0..65535, got {low}..{high}")
    pixel_type = sitk.sitkUInt8 if high <= 255 else sitk.sitkUInt16
    if label_image.GetPixelID() == pixel_type:
        return label_image
    return sitk.Cast(label_image, pixel_type)


def write_probabilities(
    probs_zyxk: np.ndarray,
    reference_image: sitk.Image,
    path: PathLike,
    overwrite: bool = False,
) -> Path:
    """Write per-class probabilities (z, y, x, k) as a k-component float32 image on the grid of
    ``reference_image`` (compressed)."""
    return atomic_write(path, probabilities_writer(probs_zyxk, reference_image, path), overwrite)


def probabilities_writer(probs_zyxk: np.ndarray, reference_image: sitk.Image, path: PathLike) -> Writer:
    """The writer (for :func:`write_outputs`) of :func:`write_probabilities`; checks everything now."""
    if path_suffix(path, OUTPUT_SUFFIXES) in (".seg.nrrd", ".dcm"):
        raise BadInputError(
            f"probabilities cannot be written as a segmentation ({path}); use .nrrd, .nii.gz or .mha"
        )
    probs = np.asarray(probs_zyxk)
    expected = tuple(reversed(reference_image.GetSize()))
    if probs.ndim != 4 or probs.shape[:3] != expected:
        raise BadInputError(
            f"probabilities have shape {probs.shape}, expected {expected} + (classes,) to match "
            f"the reference image"
        )
    image = sitk.GetImageFromArray(probs.astype(np.float32, copy=False), isVector=True)
    image.SetOrigin(reference_image.GetOrigin())
    image.SetSpacing(reference_image.GetSpacing())
    image.SetDirection(reference_image.GetDirection())
    return lambda temp: sitk.WriteImage(image, str(temp), True)
