"""image_io: reading every input format, channel grid checks, early output checks, atomic writes,
labelmaps, Slicer .seg.nrrd (read back with slicerio and with Slicer's own storage node) and
probability maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import oblique_anisotropic_image
from UNet3DSegmentLib.engine import image_io
from UNet3DSegmentLib.base.errors import BadInputError, BadModelError, CancelledError
from UNet3DSegmentLib.engine.image_io import (
    atomic_write,
    check_output_path,
    read_channels,
    read_image,
    write_labelmap,
    write_probabilities,
    write_segmentation,
)

SPACING = (0.75, 1.25, 2.5)  # exactly representable in float32 (NIfTI stores float32)
ORIGIN = (-12.5, 30.25, 7.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # axis permutation: exact in any format


def _volume(shape_zyx=(4, 5, 6), seed: int = 0) -> sitk.Image:
    values = np.random.default_rng(seed).integers(-1000, 1000, size=shape_zyx).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def _files(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd"])
def test_read_each_file_format(tmp_path: Path, suffix: str) -> None:
    image = _volume()
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(image, str(path))
    result = read_image(path)
    assert result.GetDimension() == 3
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result), sitk.GetArrayViewFromImage(image))
    np.testing.assert_allclose(result.GetSpacing(), SPACING, atol=1e-6)
    np.testing.assert_allclose(result.GetOrigin(), ORIGIN, atol=1e-5)
    np.testing.assert_allclose(result.GetDirection(), DIRECTION, atol=1e-6)


def _write_dicom_series(folder: Path, values_zyx: np.ndarray, series_uid: str, study_uid: str) -> None:
    """One CT slice per file with the tags GDCM needs to group and sort a series."""
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(values_zyx.shape[0]):
        slice_image = sitk.GetImageFromArray(values_zyx[k])
        slice_image.SetSpacing((0.75, 1.25))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{series_uid}.{k + 1}",  # SOP instance UID
            "0008|0060": "CT",
            "0010|0010": "Test^Patient",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": f"-12.5\\30.25\\{7.0 + 2.5 * k}",  # image position (patient)
            "0020|0037": "1\\0\\0\\0\\1\\0",  # image orientation (patient)
            "0018|0050": "2.5",
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(slice_image)


def test_read_dicom_folder(tmp_path: Path) -> None:
    values = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 3 - 100
    _write_dicom_series(tmp_path / "ct", values, "1.2.826.0.1.3680043.2.1125.1.101", "1.2.826.0.1.9")
    image = read_image(tmp_path / "ct")
    assert image.GetSize() == (6, 5, 4)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), values)
    np.testing.assert_allclose(image.GetSpacing(), (0.75, 1.25, 2.5), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (-12.5, 30.25, 7.0), atol=1e-6)


def test_folder_with_two_dicom_series_is_refused(tmp_path: Path) -> None:
    values = np.zeros((3, 4, 4), dtype=np.int16)
    folder = tmp_path / "mixed"
    uids = ("1.2.826.0.1.3680043.2.1125.1.201", "1.2.826.0.1.3680043.2.1125.1.202")
    for uid in uids:
        _write_dicom_series(folder, values, uid, "1.2.826.0.1.9")
    with pytest.raises(BadInputError) as caught:
        read_image(folder)
    message = str(caught.value)
    assert "2 DICOM series" in message and "one folder per series" in message
    assert all(uid in message for uid in uids)


def test_folder_without_dicom_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(BadInputError, match="holds no DICOM series"):
        read_image(tmp_path)


def test_missing_unsupported_and_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist; check the path"):
        read_image(tmp_path / "missing.nrrd")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG")
    with pytest.raises(BadInputError, match=r"unsupported extension '\.png'.*NIfTI"):
        read_image(tmp_path / "picture.png")
    (tmp_path / "broken.nrrd").write_bytes(b"this is not a NRRD header\n")
    with pytest.raises(BadInputError, match="cannot read .*broken.nrrd") as caught:
        read_image(tmp_path / "broken.nrrd")
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_4d_vector_and_2d_images_are_refused_with_the_fix(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(tmp_path / "series.mha"))
    with pytest.raises(BadInputError, match=r"is 4-D \(size \(4, 4, 4, 3\)\).*one 3-D file per volume"):
        read_image(tmp_path / "series.mha")
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), str(tmp_path / "rgb.nrrd"))
    with pytest.raises(BadInputError, match="3 components per voxel.*separate channels"):
        read_image(tmp_path / "rgb.nrrd")
    sitk.WriteImage(sitk.Image([4, 4], sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    with pytest.raises(BadInputError, match="is 2-D"):
        read_image(tmp_path / "slice.nrrd")


def test_4d_image_with_one_volume_is_read_as_3d(tmp_path: Path) -> None:
    values = np.arange(1 * 3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5)
    sitk.WriteImage(sitk.GetImageFromArray(values, isVector=False), str(tmp_path / "single.mha"))
    image = read_image(tmp_path / "single.mha")
    assert image.GetSize() == (5, 4, 3)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), values[0])


# ------------------------------------------------------------------------------------------ channels
def _save(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def test_channels_on_one_grid_are_read_in_order(tmp_path: Path) -> None:
    first = _save(_volume(seed=1), tmp_path / "t1.nrrd")
    second = _volume(seed=2)
    second.SetOrigin(tuple(v + 1e-6 for v in ORIGIN))  # within tolerance: takes the first's grid
    second_path = _save(second, tmp_path / "t2.nrrd")
    images = read_channels([first, second_path])
    assert len(images) == 2
    assert images[1].GetOrigin() == images[0].GetOrigin() == ORIGIN
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(images[1]), sitk.GetArrayViewFromImage(second))


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda im: sitk.GetImageFromArray(np.zeros((4, 5, 7), np.int16)), r"size \(7, 5, 4\) vs \(6, 5, 4\)"),
        (lambda im: im.SetSpacing((0.75, 1.25, 3.0)), r"spacing \(0\.75, 1\.25, 3\) vs \(0\.75, 1\.25, 2\.5\)"),
        (lambda im: im.SetOrigin((-12.5, 30.25, 8.0)), r"origin \(-12\.5, 30\.25, 8\) vs \(-12\.5, 30\.25, 7\)"),
        (lambda im: im.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1)), r"direction \(1, 0, 0, 0, 1, 0, 0, 0, 1\) vs"),
    ],
    ids=["size", "spacing", "origin", "direction"],
)
def test_channel_grid_mismatch_names_file_property_and_values(tmp_path: Path, change, expected: str) -> None:
    first = _save(_volume(), tmp_path / "t1.nrrd")
    other = _volume(seed=3)
    changed = change(other)
    other = changed if isinstance(changed, sitk.Image) else other
    other_path = _save(other, tmp_path / "t2.nrrd")
    with pytest.raises(BadInputError, match=expected) as caught:
        read_channels([first, other_path])
    assert "t2.nrrd" in str(caught.value) and "resample" in str(caught.value)


def test_no_channels_is_refused() -> None:
    with pytest.raises(BadInputError, match="no input volume"):
        read_channels([])


# --------------------------------------------------------------------------------- output checks
def test_check_output_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_output_path(tmp_path / "out.seg.nrrd", overwrite=False) == tmp_path / "out.seg.nrrd"
    for name in ("a.nrrd", "a.nii.gz", "a.nii", "a.mha"):
        assert check_output_path(tmp_path / name, overwrite=False).name == name
    with pytest.raises(BadInputError, match=r"unsupported extension '\.png'"):
        check_output_path(tmp_path / "out.png", overwrite=False)
    with pytest.raises(BadInputError, match="output folder .*missing does not exist"):
        check_output_path(tmp_path / "missing" / "out.nrrd", overwrite=False)
    existing = tmp_path / "done.nrrd"
    existing.write_bytes(b"old")
    with pytest.raises(BadInputError) as caught:
        check_output_path(existing, overwrite=False)
    assert str(caught.value) == f"output {existing} exists; pass --overwrite to replace it or choose another path"
    assert check_output_path(existing, overwrite=True) == existing
    (tmp_path / "folder.nrrd").mkdir()
    with pytest.raises(BadInputError, match="is a folder"):
        check_output_path(tmp_path / "folder.nrrd", overwrite=True)
    monkeypatch.setattr(image_io.os, "access", lambda path, mode: False)  # as for a read-only folder
    with pytest.raises(BadInputError, match="is not writable"):
        check_output_path(tmp_path / "out.nrrd", overwrite=False)


# ---------------------------------------------------------------------------------- atomic writes
def test_atomic_write_uses_hidden_temp_with_same_extension(tmp_path: Path) -> None:
    seen = []

    def writer(temp: Path) -> None:
        seen.append(temp)
        temp.write_bytes(b"new")

    atomic_write(tmp_path / "result.seg.nrrd", writer, overwrite=False)
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".result.")
    assert seen[0].name.endswith(".seg.nrrd")
    assert _files(tmp_path) == ["result.seg.nrrd"]
    assert (tmp_path / "result.seg.nrrd").read_bytes() == b"new"


@pytest.mark.parametrize(
    "failure, expected",
    [(RuntimeError("ITK: disk full"), BadInputError), (KeyboardInterrupt(), KeyboardInterrupt),
     (CancelledError("cancelled"), CancelledError)],
    ids=["error", "ctrl-c", "cancel"],
)
def test_atomic_write_removes_temp_on_failure(tmp_path: Path, failure: BaseException, expected) -> None:
    def writer(temp: Path) -> None:
        temp.write_bytes(b"half")
        raise failure

    with pytest.raises(expected):
        atomic_write(tmp_path / "out.nrrd", writer, overwrite=False)
    assert _files(tmp_path) == []


def test_atomic_write_never_replaces_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out.nrrd"
    target.write_bytes(b"precious")
    calls = []
    with pytest.raises(BadInputError, match="exists; pass --overwrite"):
        atomic_write(target, calls.append, overwrite=False)
    assert calls == []  # refused before any work

    # The destination appears while the temp file is being written: still not replaced.
    other = tmp_path / "late.nrrd"

    def racing_writer(temp: Path) -> None:
        temp.write_bytes(b"new")
        other.write_bytes(b"written by someone else")

    with pytest.raises(BadInputError, match="exists; pass --overwrite"):
        atomic_write(other, racing_writer, overwrite=False)
    assert other.read_bytes() == b"written by someone else"
    assert target.read_bytes() == b"precious"
    assert _files(tmp_path) == ["late.nrrd", "out.nrrd"]

    atomic_write(target, lambda temp: temp.write_bytes(b"replaced"), overwrite=True)
    assert target.read_bytes() == b"replaced"
    assert _files(tmp_path) == ["late.nrrd", "out.nrrd"]


# ------------------------------------------------------------------------------------- labelmaps
def _labels(image: sitk.Image) -> sitk.Image:
    values = np.zeros(image.GetSize()[::-1], dtype=np.int32)
    values[2:5, 3:9, 4:10] = 1
    values[10:12, 10:20, 5:7] = 3  # class 2 stays empty
    labels = sitk.GetImageFromArray(values)
    labels.CopyInformation(image)
    return labels


@pytest.mark.parametrize("name", ["labels.nrrd", "labels.nii.gz", "labels.mha"])
def test_write_labelmap_round_trip(tmp_path: Path, name: str) -> None:
    labels = _labels(oblique_anisotropic_image())
    path = write_labelmap(labels, tmp_path / name)
    result = sitk.ReadImage(str(path))
    assert result.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result), sitk.GetArrayViewFromImage(labels))
    np.testing.assert_allclose(result.GetOrigin(), labels.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(result.GetDirection(), labels.GetDirection(), atol=1e-6)
    assert _files(tmp_path) == [name]
    if name.endswith(".nrrd"):
        assert b"encoding: gzip" in path.read_bytes()[:1000]
    with pytest.raises(BadInputError, match="exists; pass --overwrite"):
        write_labelmap(labels, path)


CSF_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^91720002^Body substance"
                   "~SCT^65216001^Cerebrospinal fluid~^^~Anatomic codes - DICOM master list~^^~^^")
CLASSES = [
    ("Background", (0.0, 0.0, 0.0), None),
    ("CSF", (0.290196, 0.564706, 0.85098), CSF_TERMINOLOGY),
    ("Grey matter", (0.784314, 0.784314, 0.784314), None),
    ("White matter", (0.960784, 0.901961, 0.627451), None),
]


def test_seg_nrrd_round_trip_with_slicerio(tmp_path: Path) -> None:
    slicerio = pytest.importorskip("slicerio")
    image = oblique_anisotropic_image()
    labels = _labels(image)
    path = write_segmentation(labels, tmp_path / "brain.seg.nrrd", CLASSES)
    assert labels.GetMetaDataKeys() == ()  # the caller's image is left untouched
    segmentation = slicerio.read_segmentation(str(path))
    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == ["CSF", "Grey matter", "White matter"]
    assert [s["labelValue"] for s in segments] == [1, 2, 3]
    assert [s["layer"] for s in segments] == [0, 0, 0]
    assert [s["id"] for s in segments] == ["Segment_1", "Segment_2", "Segment_3"]
    np.testing.assert_allclose([s["color"] for s in segments], [c[1] for c in CLASSES[1:]], atol=1e-6)
    assert all(s["extent"] == [0, 27, 0, 23, 0, 19] for s in segments)  # full extent, empty one too
    assert segments[0]["terminology"]["type"] == ["SCT", "65216001", "Cerebrospinal fluid"]
    assert "terminology" not in segments[1]
    assert segmentation["masterRepresentation"] == "Binary labelmap"
    assert segmentation["referenceImageExtentOffset"] == [0, 0, 0]
    voxels = segmentation["voxels"]  # (i, j, k) = (x, y, z)
    np.testing.assert_array_equal(voxels.transpose(2, 1, 0), sitk.GetArrayViewFromImage(labels))
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps, atol=1e-9)


def test_seg_nrrd_opens_in_slicer_as_named_coloured_segments(tmp_path: Path) -> None:
    slicer = pytest.importorskip("slicer")
    from vtk.util.numpy_support import vtk_to_numpy

    labels = _labels(oblique_anisotropic_image())
    path = write_segmentation(labels, tmp_path / "brain.seg.nrrd", CLASSES)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    expected = sitk.GetArrayViewFromImage(labels)
    for index, (name, color, terminology) in enumerate(CLASSES[1:]):
        segment = segmentation.GetSegment(f"Segment_{index + 1}")
        assert segment.GetName() == name
        np.testing.assert_allclose(segment.GetColor(), color, atol=1e-6)
        assert segment.GetLabelValue() == index + 1
        if terminology:
            assert segment.GetTerminology() == terminology
        labelmap = segment.GetRepresentation("Binary labelmap")
        voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(labelmap.GetDimensions()[::-1])
        np.testing.assert_array_equal(voxels == index + 1, expected == index + 1)
    geometry = segmentation.GetConversionParameter("Reference image geometry")
    assert geometry.endswith(";0;27;0;23;0;19;")


def test_write_segmentation_refuses_unnamed_labels_and_wrong_suffix(tmp_path: Path) -> None:
    labels = _labels(oblique_anisotropic_image())
    with pytest.raises(BadModelError, match="holds label 3 but only 3 classes"):
        write_segmentation(labels, tmp_path / "x.seg.nrrd", CLASSES[:3])
    with pytest.raises(BadInputError, match="must end in .seg.nrrd"):
        write_segmentation(labels, tmp_path / "x.nrrd", CLASSES)
    with pytest.raises(BadModelError, match="colour"):
        write_segmentation(labels, tmp_path / "x.seg.nrrd", CLASSES[:3] + [("Bad", (255, 0, 0), None)])
    assert _files(tmp_path) == []


def test_write_probabilities_round_trip(tmp_path: Path) -> None:
    reference = oblique_anisotropic_image(shape_zyx=(5, 6, 7))
    probs = np.random.default_rng(0).random((5, 6, 7, 3)).astype(np.float32)
    path = write_probabilities(probs, reference, tmp_path / "probs.nrrd")
    result = sitk.ReadImage(str(path))
    assert result.GetNumberOfComponentsPerPixel() == 3 and result.GetSize() == (7, 6, 5)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result), probs)
    np.testing.assert_allclose(result.GetOrigin(), reference.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(result.GetDirection(), reference.GetDirection(), atol=1e-9)
    with pytest.raises(BadInputError, match=r"shape \(5, 6, 8, 3\), expected \(5, 6, 7\)"):
        write_probabilities(np.zeros((5, 6, 8, 3)), reference, tmp_path / "bad.nrrd")
    assert _files(tmp_path) == ["probs.nrrd"]
