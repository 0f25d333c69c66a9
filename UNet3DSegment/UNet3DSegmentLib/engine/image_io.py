"""Read input volumes and write results, with SimpleITK only.

Inputs: NRRD, NIfTI, MetaImage files or a folder holding one DICOM series; several files are
several channels and must share one voxel grid. Outputs are written to a hidden temporary file in
the destination folder and renamed into place, so a cancelled or failed run never leaves a
half-written file and never replaces an existing file unless asked to.

Segmentations can be written as Slicer's ``.seg.nrrd``: one labelmap layer plus the NRRD key/value
fields that Slicer's ``vtkMRMLSegmentationStorageNode`` reads (``Segment{i}_ID``, ``_Name``,
``_Color``, ``_LabelValue``, ``_Layer``, ``_Extent``, ``_Tags``, ...), so Slicer opens the file as a
segmentation with named, coloured segments and terminology.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..base.errors import BadInputError, BadModelError, UNet3DSegmentError

PathLike = Union[str, os.PathLike]
# (name, (r, g, b) in [0, 1], Slicer terminology entry string or None); index i is label value i.
SegmentClass = Tuple[str, Sequence[float], Optional[str]]

INPUT_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
# Longest first, so that ".seg.nrrd" wins over ".nrrd" and ".nii.gz" over ".gz".
OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha")
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
def read_image(path: PathLike) -> sitk.Image:
    """Read one scalar 3-D volume from an image file or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"input {path} does not exist; check the path")
    if path.is_dir():
        image = _read_dicom_folder(path)
    else:
        suffix = path_suffix(path, INPUT_SUFFIXES)
        if suffix not in INPUT_SUFFIXES:
            raise BadInputError(f"input {path} has the unsupported extension '{suffix}'; {_INPUT_HINT}")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()  # header only: reject 4-D/vector files before the pixels
            _check_scalar_3d(path, reader.GetDimension(), reader.GetSize(),
                             reader.GetNumberOfComponents())
            image = reader.Execute()
        except RuntimeError as error:
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
    folder = path.parent
    if not folder.is_dir():
        raise BadInputError(f"output folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"output folder {folder} is not writable; choose another folder")
    if path.is_dir():
        raise BadInputError(f"output {path} is a folder; give a file name such as {path / 'segmentation.nrrd'}")
    if path.exists() and not overwrite:
        raise BadInputError(f"output {path} exists; pass --overwrite to replace it or choose another path")
    return path


def atomic_write(path: PathLike, writer: Callable[[Path], None], overwrite: bool) -> Path:
    """Let ``writer`` write a hidden temporary file beside ``path``, then rename it into place.

    The temporary file keeps the destination's extension so SimpleITK picks the right file
    format. It is removed on any exception, KeyboardInterrupt and cancellation included. Without
    ``overwrite`` an existing file is never replaced, even one that appeared during the write.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise BadInputError(f"output {path} exists; pass --overwrite to replace it or choose another path")
    suffix = path_suffix(path, OUTPUT_SUFFIXES)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    temp = path.with_name(f".{stem}.tmp-{secrets.token_hex(4)}{suffix}")
    try:
        try:
            writer(temp)
        except (RuntimeError, OSError) as error:
            raise BadInputError(
                f"cannot write {path}: {_first_line(error)}; check free disk space and permissions"
            ) from error
        if not temp.is_file():
            raise UNet3DSegmentError(f"internal error: the writer of {path} produced no file")
        if overwrite:
            os.replace(temp, path)
        else:
            _move_without_replacing(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    return path


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
    labels = _as_label_image(label_image)
    return atomic_write(path, lambda temp: sitk.WriteImage(labels, str(temp), True), overwrite)


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
    return atomic_write(path, lambda temp: sitk.WriteImage(labels, str(temp), True), overwrite)


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
    if path_suffix(path, OUTPUT_SUFFIXES) == ".seg.nrrd":
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
    return atomic_write(path, lambda temp: sitk.WriteImage(image, str(temp), True), overwrite)
