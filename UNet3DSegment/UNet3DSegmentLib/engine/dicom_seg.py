"""DICOM Segmentation (SEG) output, written with highdicom (optional: ``pip install 'unet3dsegment[dicom]'``).

When the input is a DICOM series, ``-o out.dcm`` writes one DICOM SEG instance (Segmentation Storage,
``BINARY`` segments) in a new series of the source study:

- references: every source instance (Referenced Series / Instance Sequence, and per frame the
  Source Image Sequence), the source's study, patient and frame of reference;
- one segment per non-background class of the model card (label value ``i`` = segment number ``i``,
  described even when empty): its name, its colour as the recommended display CIELab value, and its
  SNOMED category/type (and type modifier) codes from the card's ``terminology``; a class without
  terminology gets SCT 85756007 "Tissue" as both category and type;
- algorithm identification: the card's name and version, family DCM 123110 "Artificial
  Intelligence", algorithm type ``AUTOMATIC``;
- frames on the source geometry: label slice ``k`` is matched to the source instance at the same
  position along the slice normal (``ImagePositionPatient`` projected on the normal of
  ``ImageOrientationPatient``), never by file name or instance number, so oblique and reversed
  series are referenced correctly; frames holding no segment are left out (highdicom's default).

Only single-frame source series are handled (one instance per slice, as CT and MR scanners write
them); an enhanced multi-frame source, or slices on different orientations, are refused.
highdicom and pydicom are imported only here and only when a SEG is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from ..base.errors import BadInputError, BadModelError, UNet3DSegmentError

PathLike = Union[str, os.PathLike]

DICOM_SEG_SUFFIX = ".dcm"
INSTALL_HINT = "pip install 'unet3dsegment[dicom]'"
# Code triplets (coding scheme designator, code value, code meaning).
GENERIC_CATEGORY = ("SCT", "85756007", "Tissue")  # CID 7150 Segmentation Property Categories
GENERIC_TYPE = ("SCT", "85756007", "Tissue")  # CID 7151 Segmentation Property Types
ALGORITHM_FAMILY = ("DCM", "123110", "Artificial Intelligence")  # CID 7162 Surgical/Algorithm Family
MANUFACTURER = "UNet3DSegment"
GEOMETRY_TOLERANCE = 1e-3  # direction cosines (absolute) and pixel spacing (relative); slices: 1/4 of the gap
_LO = 64  # longest value of a DICOM LO (Long String) element


def is_dicom_seg_path(path: PathLike) -> bool:
    """Whether ``path`` asks for a DICOM SEG (it ends in ``.dcm``)."""
    return Path(path).name.lower().endswith(DICOM_SEG_SUFFIX)


def require_highdicom() -> Any:
    """Import highdicom (and so pydicom), or raise ``BadInputError`` naming the extra to install."""
    try:
        import highdicom
        import pydicom  # noqa: F401 - highdicom's own dependency, used here directly
    except ImportError as error:
        raise BadInputError(
            f"writing DICOM SEG (.dcm) needs highdicom, which is not installed ({error}); run "
            f"{INSTALL_HINT}, or write .seg.nrrd or .nrrd instead"
        ) from None
    return highdicom


@dataclass(frozen=True)
class DicomSource:
    """The headers of one single-frame DICOM series, sorted along the slice normal (ascending)."""

    files: Tuple[Path, ...]
    datasets: Tuple[Any, ...]  # pydicom Datasets without pixel data, in the order of ``files``
    row: np.ndarray  # direction of increasing column index (ImageOrientationPatient[0:3])
    column: np.ndarray  # direction of increasing row index (ImageOrientationPatient[3:6])
    normal: np.ndarray  # row x column
    positions: np.ndarray  # ImagePositionPatient . normal of each dataset, ascending
    rows: int
    columns: int
    pixel_spacing: Tuple[float, float]  # (between rows, between columns) = (y, x) in mm

    @property
    def name(self) -> str:
        return str(self.files[0].parent) if self.files else "(no files)"


def _not_dicom(path: Path, what: str) -> BadInputError:
    return BadInputError(
        f"DICOM SEG output (.dcm) needs a DICOM series as input (a folder of DICOM files), but {path} "
        f"is {what}; write .seg.nrrd, .nrrd or .nii.gz instead"
    )


def check_dicom_input(inputs: Sequence[PathLike]) -> DicomSource:
    """The DICOM series behind the first input (the grid the labelmap lies on), for ``-o x.dcm``.

    A non-DICOM input (an image file, a folder without DICOM) is refused before anything else runs;
    so is a missing highdicom. The SEG references the first channel's series.
    """
    if not inputs:
        raise BadInputError("no input volume given; pass at least one image file or DICOM folder")
    from .image_io import INPUT_SUFFIXES, path_suffix

    first = Path(inputs[0])
    if not first.exists():
        raise BadInputError(f"input {first} does not exist; check the path")
    if first.is_file():
        suffix = path_suffix(first, INPUT_SUFFIXES)
        raise _not_dicom(first, f"a {suffix} file" if suffix else "a file")
    require_highdicom()
    return read_dicom_source(first)


def read_dicom_source(source: Union[PathLike, Sequence[PathLike]]) -> DicomSource:
    """Read the headers (no pixel data) of a DICOM series: a folder holding one series, or its files.

    A folder is listed as the engine reads it (GDCM, through SimpleITK), so the SEG references the
    same files the labelmap was computed from.
    """
    require_highdicom()
    import pydicom

    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise _not_dicom(folder, "not a folder" if folder.exists() else "missing")
        files = _series_files(folder)
    else:
        files = [Path(p) for p in source]
        if not files:
            raise BadInputError("no DICOM files given for the DICOM SEG's source series")
    datasets = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(str(path), stop_before_pixels=True))
        except Exception as error:  # noqa: BLE001 - pydicom raises many kinds for a bad file
            raise BadInputError(
                f"cannot read the DICOM file {path}: {' '.join(str(error).split())[:200]}; check that the "
                f"series is complete"
            ) from error
    return _sorted_source(files, datasets)


def _series_files(folder: Path) -> list[Path]:
    import SimpleITK as sitk

    from .image_io import _itk_warnings_off

    with _itk_warnings_off():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        if not series_ids:
            raise _not_dicom(folder, "a folder without a DICOM series")
        if len(series_ids) > 1:
            raise BadInputError(
                f"input folder {folder} holds {len(series_ids)} DICOM series; pass one folder per series"
            )
        return [Path(name) for name in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])]


def _sorted_source(files: Sequence[Path], datasets: Sequence[Any]) -> DicomSource:
    first = datasets[0]
    where = files[0].parent
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in datasets}
    if len(series) != 1:
        raise BadInputError(f"the DICOM files in {where} belong to {len(series)} series; pass one series")
    for path, ds in zip(files, datasets):
        missing = [key for key in ("SOPInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
                                   "PixelSpacing", "Rows", "Columns") if key not in ds]
        if missing:
            raise BadInputError(
                f"DICOM file {path} lacks {', '.join(missing)}; DICOM SEG output needs cross-sectional "
                f"images with patient geometry (CT, MR, PET ...)"
            )
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise BadInputError(
                f"DICOM file {path} is a multi-frame (enhanced) image; DICOM SEG output handles series of "
                f"single-frame images only: write .seg.nrrd or .nrrd instead"
            )
    orientation = _vector(first, "ImageOrientationPatient", 6, files[0])
    if np.linalg.norm(np.cross(orientation[:3], orientation[3:])) < 1e-3:
        raise BadInputError(f"DICOM file {files[0]} has an ImageOrientationPatient whose row and column are "
                            "parallel or zero; the series has no valid geometry")
    for path, ds in zip(files, datasets):
        other = _vector(ds, "ImageOrientationPatient", 6, path)
        _vector(ds, "ImagePositionPatient", 3, path)
        if np.abs(other - orientation).max() > GEOMETRY_TOLERANCE:
            raise BadInputError(
                f"DICOM file {path} has another ImageOrientationPatient than {files[0].name}; the series is "
                f"not one volume"
            )
        if (int(ds.Rows), int(ds.Columns)) != (int(first.Rows), int(first.Columns)):
            raise BadInputError(f"DICOM file {path} has another image size than {files[0].name}")
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    positions = np.array([np.dot([float(v) for v in ds.ImagePositionPatient], normal) for ds in datasets])
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    if len(positions) > 1 and np.min(np.diff(positions)) < 1e-4 * max(1.0, float(np.ptp(positions))):
        raise BadInputError(
            f"the DICOM series in {where} has several images at one slice position (several echoes, "
            f"phases or time points?); DICOM SEG output needs one image per slice"
        )
    return DicomSource(
        files=tuple(files[i] for i in order),
        datasets=tuple(datasets[i] for i in order),
        row=row,
        column=column,
        normal=normal,
        positions=positions,
        rows=int(first.Rows),
        columns=int(first.Columns),
        pixel_spacing=(float(first.PixelSpacing[0]), float(first.PixelSpacing[1])),
    )


def frames_on_source(labels: Any, source: DicomSource) -> np.ndarray:
    """The labels as one frame per source dataset (``source.datasets`` order): ``(n, rows, columns)``.

    ``labels`` is a SimpleITK image (its geometry is used: each slice is matched to the source
    instance at its position along the normal) or a ``(z, y, x)`` array whose slices are in the
    order the engine reads the series (ascending along the normal, as ``source.datasets``).
    """
    if isinstance(labels, np.ndarray):
        array = labels
        expected = (len(source.datasets), source.rows, source.columns)
        if array.shape != expected:
            raise BadInputError(
                f"the labelmap has shape {array.shape} (z, y, x) but the DICOM series in {source.name} is "
                f"{expected}; pass the labelmap segmented from that series"
            )
        return array
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(labels)
    size = labels.GetSize()
    if (size[0], size[1]) != (source.columns, source.rows):
        raise BadInputError(
            f"the labelmap's slices are {size[0]}x{size[1]} but the DICOM series in {source.name} has "
            f"{source.columns}x{source.rows} images; pass the labelmap segmented from that series"
        )
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    spacing = np.array(labels.GetSpacing())
    if (np.abs(direction[:, 0] - source.row).max() > GEOMETRY_TOLERANCE
            or np.abs(direction[:, 1] - source.column).max() > GEOMETRY_TOLERANCE
            or abs(spacing[0] - source.pixel_spacing[1]) > GEOMETRY_TOLERANCE * source.pixel_spacing[1]
            or abs(spacing[1] - source.pixel_spacing[0]) > GEOMETRY_TOLERANCE * source.pixel_spacing[0]):
        raise BadInputError(
            f"the labelmap's in-plane grid differs from the DICOM series in {source.name} (orientation or "
            f"pixel spacing); pass the labelmap segmented from that series"
        )
    origin = np.array(labels.GetOrigin())
    slice_positions = [float(np.dot(origin + k * spacing[2] * direction[:, 2], source.normal))
                       for k in range(size[2])]
    gaps = np.diff(source.positions)
    tolerance = 0.25 * float(gaps.min()) if len(gaps) else 0.25 * max(float(spacing[2]), 1e-3)
    frames = np.zeros((len(source.datasets), source.rows, source.columns), dtype=array.dtype)
    taken = np.full(len(source.datasets), -1)
    for k, position in enumerate(slice_positions):
        index = int(np.argmin(np.abs(source.positions - position)))
        if abs(source.positions[index] - position) > tolerance or taken[index] >= 0:
            raise BadInputError(
                f"labelmap slice {k} (at {position:.3f} mm along the slice normal) matches no image of the "
                f"DICOM series in {source.name}; pass the labelmap segmented from that series"
            )
        taken[index] = k
        frames[index] = array[k]
    if (taken < 0).any():
        raise BadInputError(
            f"the labelmap covers {size[2]} slices but the DICOM series in {source.name} has "
            f"{len(source.datasets)} images; pass the labelmap segmented from that series"
        )
    return frames


def rgb_to_cielab(red: int, green: int, blue: int) -> Tuple[float, float, float]:
    """CIE 1976 L*a*b* of an sRGB colour (components 0..255), D65 white point, as DICOM's
    Recommended Display CIELab Value takes it (L* in 0..100, a* and b* in -128..127).

    Own conversion (sRGB transfer curve, sRGB-to-XYZ matrix, XYZ-to-Lab): highdicom's
    ``CIELabColor.from_rgb`` is missing from the oldest highdicom this package accepts.
    """

    def linear(component: float) -> float:
        c = component / 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = linear(red), linear(green), linear(blue)
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883
    delta = 6.0 / 29.0

    def f(t: float) -> float:
        return t ** (1.0 / 3.0) if t > delta ** 3 else t / (3.0 * delta ** 2) + 4.0 / 29.0

    lightness = min(100.0, max(0.0, 116.0 * f(y) - 16.0))
    a_star = min(127.0, max(-128.0, 500.0 * (f(x) - f(y))))
    b_star = min(127.0, max(-128.0, 200.0 * (f(y) - f(z))))
    return lightness, a_star, b_star


def _lo(text: str) -> str:
    """``text`` as a valid DICOM LO value: one line, no backslash (the value separator), <= 64 chars."""
    return " ".join(str(text).replace("\\", "/").split())[:_LO]


def _code(triplet: Sequence[str]) -> Any:
    from pydicom.sr.coding import Code

    scheme, value, meaning = (str(part) for part in triplet)
    return Code(value=value, scheme_designator=scheme, meaning=_lo(meaning))


def _segment_descriptions(card: Any, algorithm: Any) -> list:
    import highdicom as hd

    descriptions = []
    for number, info in enumerate(card.classes[1:], start=1):
        terminology = getattr(info, "terminology", None)
        category = terminology.category if terminology else GENERIC_CATEGORY
        kind = terminology.type if terminology else GENERIC_TYPE
        red, green, blue = (int(info.color[i:i + 2], 16) for i in (1, 3, 5))
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=_lo(info.name),
            segmented_property_category=_code(category),
            segmented_property_type=_code(kind),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor(*rgb_to_cielab(red, green, blue)),
        )
        if terminology is not None and terminology.type_modifier:
            modifier = hd.sr.CodedConcept.from_code(_code(terminology.type_modifier))
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        descriptions.append(description)
    return descriptions


def build_dicom_seg(
    labels: Any,
    source: Union[DicomSource, PathLike, Sequence[PathLike]],
    card: Any,
    series_number: Optional[int] = None,
    series_description: Optional[str] = None,
) -> Any:
    """The ``highdicom.seg.Segmentation`` of ``labels`` (SimpleITK image or ``(z, y, x)`` array) over
    the source series; see the module docstring for what it holds."""
    hd = require_highdicom()
    from pydicom.sr.coding import Code

    from .. import __version__

    if not isinstance(source, DicomSource):
        source = read_dicom_source(source)
    frames = frames_on_source(labels, source)
    if not np.issubdtype(frames.dtype, np.integer) or (frames.size and int(frames.min()) < 0):
        raise BadInputError(f"a labelmap must hold non-negative integers, got {frames.dtype}")
    highest = int(frames.max(initial=0))
    if highest >= len(card.classes):
        raise BadModelError(
            f"the labelmap holds label {highest} but the model card names only {len(card.classes)} classes; "
            f"give the model card one class per output channel"
        )
    if len(card.classes) < 2:
        raise BadModelError("the model card names no class besides the background; nothing to write as a segment")
    frames = frames.astype(np.uint8 if len(card.classes) <= 256 else np.uint16, copy=False)
    family_scheme, family_value, family_meaning = ALGORITHM_FAMILY
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(card.name),
        family=Code(family_value, family_scheme, family_meaning),
        version=_lo(card.version or "unspecified"),
        source=MANUFACTURER,
    )
    first = source.datasets[0]
    if series_number is None:
        series_number = min(int(getattr(first, "SeriesNumber", 0) or 0) + 1000, 2**31 - 1)
    description = series_description or f"{card.name} segmentation"
    seg = hd.seg.Segmentation(
        source_images=list(source.datasets),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(card, algorithm),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=str(__version__),
        device_serial_number="0",
        content_description=_lo(card.description or description),
        content_label="SEGMENTATION",
        series_description=_lo(description),
        omit_empty_frames=bool(highest),  # an all-background result keeps its (empty) frames
    )
    return seg


def _save(dataset: Any, path: Path) -> None:
    try:  # pydicom >= 3
        dataset.save_as(str(path), enforce_file_format=True)
    except TypeError:  # pydicom 2
        dataset.save_as(str(path), write_like_original=False)


def dicom_seg_writer(
    labels: Any,
    source: Union[DicomSource, PathLike, Sequence[PathLike]],
    output_path: PathLike,
    card: Any,
    series_number: Optional[int] = None,
    series_description: Optional[str] = None,
) -> Any:
    """The writer (for ``image_io.write_outputs``) of :func:`write_dicom_seg`; the SEG is built now,
    so every check happens before any file is touched."""
    if not is_dicom_seg_path(output_path):
        raise BadInputError(f"DICOM SEG output {output_path} must end in {DICOM_SEG_SUFFIX}; rename it")
    try:
        seg = build_dicom_seg(labels, source, card, series_number, series_description)
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        if isinstance(error, UNet3DSegmentError):  # ours (BadInputError, BadModelError are ValueErrors)
            raise
        raise BadInputError(
            f"cannot build the DICOM SEG from the series in {getattr(source, 'name', source)}: "
            f"{' '.join(str(error).split())[:300]}"
        ) from error
    return lambda temp: _save(seg, temp)


def write_dicom_seg(
    labels: Any,
    source_series_folder_or_files: Union[DicomSource, PathLike, Sequence[PathLike]],
    output_path: PathLike,
    card: Any,
    overwrite: bool = False,
    series_number: Optional[int] = None,
    series_description: Optional[str] = None,
) -> Path:
    """Write ``labels`` as a DICOM SEG over the source series, atomically (temporary file + rename).

    ``labels``: a ``(z, y, x)`` integer array in the engine's slice order (ascending along the slice
    normal, as ``read_image`` returns the series) or the SimpleITK label image on the series' grid
    (slices then matched by position). ``card``: the ``ModelCard`` (classes, name, version). Returns
    the path written.
    """
    from .image_io import atomic_write

    writer = dicom_seg_writer(labels, source_series_folder_or_files, output_path, card,
                              series_number, series_description)
    return atomic_write(output_path, writer, overwrite)


def _vector(dataset: Any, keyword: str, length: int, path: Any) -> np.ndarray:
    """A numeric DICOM attribute of ``length`` finite values, or a one-line ``BadInputError`` naming the file."""
    try:
        values = np.array([float(v) for v in getattr(dataset, keyword)], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([])
    if values.shape != (length,) or not np.all(np.isfinite(values)):
        raise BadInputError(f"DICOM file {path} has an invalid {keyword} (expected {length} numbers); the series "
                            "has no usable geometry: export it again")
    return values
