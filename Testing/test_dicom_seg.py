"""DICOM Segmentation output (``-o out.dcm``, engine/dicom_seg.py): small CT and MR series built with
pydicom (axial with rescale, oblique, files named against the slice order), segmented through the
command line into a DICOM SEG and a NRRD labelmap in the same way, the SEG read back with highdicom:
SOP class, referenced UIDs, segment labels, codes, colours, algorithm, and the decoded masks voxel
for voxel against the labelmap."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TINY_CARD
from UNet3DSegmentLib.base.errors import EXIT_BAD_INPUT, BadInputError
from UNet3DSegmentLib.cli.main import main
from UNet3DSegmentLib.engine.card import card_from_dict

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SHAPE = (8, 16, 16)  # slices, rows, columns


def _oblique_orientation() -> np.ndarray:
    """Row and column cosines of an oblique plane (rotated about two axes)."""
    a, b = np.deg2rad(25.0), np.deg2rad(15.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    rotation = rz @ rx
    return np.concatenate([rotation[:, 0], rotation[:, 1]])


def write_series(
    folder: Path,
    modality: str,
    values: np.ndarray,
    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    origin=(-20.0, 35.5, 12.0),
    pixel_spacing=(1.25, 0.9),  # (between rows, between columns)
    slice_gap: float = 3.0,
    rescale=None,  # (slope, intercept) for CT
    uid_root: str = "1.2.826.0.1.3680043.10.1134",
) -> list[str]:
    """Write one single-frame DICOM file per slice; returns the SOP instance UIDs in slice order.

    File names and instance numbers run against the slice order (file 000 is the last slice), so a
    writer that maps by name or number would reference the wrong instances.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir(parents=True)
    orientation = np.asarray(orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    sop_class = CT_STORAGE if modality == "CT" else MR_STORAGE
    study, series, frame_of_reference = f"{uid_root}.1", f"{uid_root}.2", f"{uid_root}.3"
    uids = []
    count = values.shape[0]
    for k in range(count):
        uid = f"{uid_root}.10.{k + 1}"
        uids.append(uid)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "PH001", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 7, count - k
        ds.Manufacturer = "Phantom"
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin) + k * slice_gap * normal]
        ds.PixelSpacing = [str(v) for v in pixel_spacing]
        ds.SliceThickness = str(slice_gap)
        ds.Rows, ds.Columns = values.shape[1], values.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = str(rescale[0]), str(rescale[1]), "HU"
        ds.PixelData = values[k].astype("<i2").tobytes()
        ds.save_as(str(folder / f"IM{count - 1 - k:03d}"), enforce_file_format=True)
    return uids


def phantom(seed: int) -> np.ndarray:
    """Stored values: a bright ball in a darker box, noise, zero outside."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(SHAPE)
    ball = (z - 4) ** 2 / 9 + (y - 8) ** 2 / 25 + (x - 7) ** 2 / 30 < 1
    values = rng.normal(300, 40, SHAPE)
    values[ball] += 500
    values[:, :2, :] = 0
    return values.astype(np.int16)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dicom")
    made = {}
    made["ct"] = (root / "ct", write_series(root / "ct", "CT", phantom(1), rescale=(1, -1024)))
    made["mr-oblique"] = (root / "mr", write_series(root / "mr", "MR", phantom(2),
                                                     orientation=_oblique_orientation(),
                                                     origin=(10.0, -40.0, 55.0), slice_gap=2.2,
                                                     uid_root="1.2.826.0.1.3680043.10.1135"))
    return made


def segment(inputs: Path, output: Path, model: Path) -> int:
    return main(["segment", str(inputs), "-o", str(output), "--model", str(model), "--progress", "none"])


def slice_uids_of(labelmap: sitk.Image, folder: Path) -> list[str]:
    """The source instance under each labelmap slice, found by position along the slice normal
    (independently of the writer)."""
    datasets = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in sorted(folder.iterdir())]
    orientation = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    where = {ds.SOPInstanceUID: float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal))
             for ds in datasets}
    uids = []
    for k in range(labelmap.GetSize()[2]):
        position = float(np.dot(labelmap.TransformIndexToPhysicalPoint((0, 0, k)), normal))
        uid = min(where, key=lambda u: abs(where[u] - position))
        assert abs(where[uid] - position) < 1e-3
        uids.append(uid)
    return uids


def rgb_of(dicom_lab: list) -> tuple:
    return hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in dicom_lab)).to_rgb()


def check_segment_descriptions(seg, card) -> None:
    items = list(seg.SegmentSequence)
    assert [int(item.SegmentNumber) for item in items] == list(range(1, len(card.classes)))
    for item, info in zip(items, card.classes[1:]):
        assert item.SegmentLabel == info.name
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        got = ((category.CodingSchemeDesignator, category.CodeValue, category.CodeMeaning),
               (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning))
        if info.terminology is not None:
            assert got == (tuple(info.terminology.category), tuple(info.terminology.type))
        else:  # the generic code the README names
            assert got == (("SCT", "85756007", "Tissue"), ("SCT", "85756007", "Tissue"))
        expected = tuple(int(info.color[i:i + 2], 16) for i in (1, 3, 5))
        assert np.abs(np.subtract(rgb_of(item.RecommendedDisplayCIELabValue), expected)).max() <= 1
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (card.name, card.version)
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodingSchemeDesignator, family.CodeValue) == ("DCM", "123110")  # Artificial Intelligence


def check_references_and_frames(seg, folder: Path, uids: list[str]) -> None:
    source = pydicom.dcmread(str(next(folder.iterdir())), stop_before_pixels=True)
    by_uid = {ds.SOPInstanceUID: ds for ds in
              (pydicom.dcmread(str(p), stop_before_pixels=True) for p in folder.iterdir())}
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.PatientID == source.PatientID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID: item.ReferencedSOPClassUID
                  for item in series.ReferencedInstanceSequence}
    assert referenced == {uid: source.SOPClassUID for uid in uids}
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose(np.array(orientation, dtype=float),
                               np.array(source.ImageOrientationPatient, dtype=float), atol=1e-6)
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame lies on its source instance
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float),
                                   np.array(by_uid[uid].ImagePositionPatient, dtype=float), atol=1e-4)


def check_masks(seg, labels: np.ndarray, uids: list[str], classes: int) -> None:
    decoded = seg.get_pixels_by_source_instance(uids, combine_segments=True,
                                                assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(decoded, labels)
    for number in range(1, classes):
        mask = seg.get_pixels_by_source_instance(uids, segment_numbers=[number],
                                                 assert_missing_frames_are_empty=True)[..., 0]
        np.testing.assert_array_equal(mask.astype(bool), labels == number, err_msg=f"segment {number}")


@pytest.mark.parametrize("name", ["ct", "mr-oblique"])
def test_dicom_seg_references_the_series_and_equals_the_labelmap(
        name: str, series: dict, tmp_path: Path, tiny_model_path: Path):
    folder, uids = series[name]
    assert segment(folder, tmp_path / "out.dcm", tiny_model_path) == 0
    assert segment(folder, tmp_path / "out.nrrd", tiny_model_path) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dcm", "out.nrrd"]  # no temporaries left
    labelmap = sitk.ReadImage(str(tmp_path / "out.nrrd"))
    labels = sitk.GetArrayFromImage(labelmap)
    assert len(np.unique(labels)) >= 2  # the tiny model's result has segments to compare
    seg = hd.seg.segread(str(tmp_path / "out.dcm"))
    card = card_from_dict(TINY_CARD)

    check_references_and_frames(seg, folder, uids)
    check_segment_descriptions(seg, card)
    slice_uids = slice_uids_of(labelmap, folder)
    assert sorted(slice_uids) == sorted(uids)
    check_masks(seg, labels, slice_uids, len(card.classes))


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("unet3d-segment: error: ")
    return err[0]


def test_non_dicom_input_to_dicom_seg_is_refused_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Refused before the volume is read or the model loaded: a missing model would be exit 4."""
    image = sitk.GetImageFromArray(phantom(3).astype(np.float32))
    source = tmp_path / "in" / "volume.nii.gz"
    source.parent.mkdir()
    sitk.WriteImage(image, str(source))
    out = tmp_path / "out"
    out.mkdir()
    missing_model = tmp_path / "missing.keras"
    assert segment(source, out / "seg.dcm", missing_model) == EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert "DICOM SEG output (.dcm) needs a DICOM series as input" in line
    assert "volume.nii.gz is a .nii.gz file" in line and "write .seg.nrrd" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert segment(empty, out / "seg.dcm", missing_model) == EXIT_BAD_INPUT
    assert "a folder without a DICOM series" in one_error_line(capsys)
    assert list(out.iterdir()) == []


def test_without_highdicom_dicom_seg_names_the_extra(
        series: dict, tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    assert segment(series["ct"][0], tmp_path / "seg.dcm", tiny_model_path) == EXIT_BAD_INPUT
    assert "pip install 'unet3dsegment[dicom]'" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_probabilities_cannot_be_dicom(series: dict, tmp_path: Path, tiny_model_path: Path,
                                       capsys: pytest.CaptureFixture):
    code = main(["segment", str(series["ct"][0]), "-o", str(tmp_path / "seg.dcm"), "--model", str(tiny_model_path),
                 "--probabilities", str(tmp_path / "p.dcm"), "--progress", "none"])
    assert code == EXIT_BAD_INPUT and "probabilities cannot be written as DICOM" in one_error_line(capsys)


def synthetic_labels(shape) -> np.ndarray:
    """Every class of the tiny card, in slabs and a diagonal, background elsewhere."""
    z, y, x = np.indices(shape)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[(x + y) % 5 == 0] = 1
    labels[y > 11] = 2
    labels[(z >= 5) & (x < 4)] = 3
    labels[0] = 0  # an empty slice: its frame is left out, its decoded mask is zero
    return labels


def test_write_dicom_seg_from_an_array_in_the_engines_slice_order(series: dict, tmp_path: Path):
    """The function batch calls: a (z, y, x) array in the order read_image returns the series."""
    from UNet3DSegmentLib.engine.dicom_seg import write_dicom_seg
    from UNet3DSegmentLib.engine.image_io import read_image

    folder, uids = series["mr-oblique"]
    image = read_image(folder)
    labels = synthetic_labels(SHAPE)
    card = card_from_dict(TINY_CARD)
    written = write_dicom_seg(labels, folder, tmp_path / "labels.dcm", card)
    assert written == tmp_path / "labels.dcm" and [p.name for p in tmp_path.iterdir()] == ["labels.dcm"]
    seg = hd.seg.segread(str(written))
    reference = sitk.GetImageFromArray(labels)
    reference.CopyInformation(image)
    check_references_and_frames(seg, folder, uids)
    check_segment_descriptions(seg, card)
    check_masks(seg, labels, slice_uids_of(reference, folder), len(card.classes))
    assert len(seg.PerFrameFunctionalGroupsSequence) < labels.shape[0] * 3  # empty frames left out
    with pytest.raises(BadInputError, match="exists; pass --overwrite"):
        write_dicom_seg(labels, folder, written, card)
    # The same labels as an image on the series' grid, listed as files: slices matched by position.
    files = sorted(folder.iterdir(), reverse=True)
    write_dicom_seg(reference, files, written, card, overwrite=True)
    check_masks(hd.seg.segread(str(written)), labels, slice_uids_of(reference, folder), len(card.classes))


def test_all_background_labelmap_is_written_with_empty_segments(series: dict, tmp_path: Path):
    """Also: a type modifier from the card is kept; a long multi-line description becomes a valid LO."""
    from UNet3DSegmentLib.engine.dicom_seg import write_dicom_seg

    folder, uids = series["ct"]
    data = copy.deepcopy(TINY_CARD)
    data["description"] = "Tiny model\nfor tests, " + "long " * 20
    data["classes"][2]["terminology"] = {"category": ["SCT", "123037004", "Anatomical Structure"],
                                         "type": ["SCT", "51216001", "Kidney"],
                                         "type_modifier": ["SCT", "7771000", "Left"]}
    card = card_from_dict(data)
    seg = hd.seg.segread(str(write_dicom_seg(np.zeros(SHAPE, np.uint8), folder, tmp_path / "empty.dcm", card)))
    assert len(seg.SegmentSequence) == 3
    check_segment_descriptions(seg, card)
    kind = seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]
    modifier = kind.SegmentedPropertyTypeModifierCodeSequence[0]
    assert (modifier.CodingSchemeDesignator, modifier.CodeValue, modifier.CodeMeaning) == ("SCT", "7771000", "Left")
    assert seg.ContentDescription.startswith("Tiny model for tests, long") and len(seg.ContentDescription) <= 64
    assert not seg.get_pixels_by_source_instance(uids, combine_segments=True).any()


def test_labelmap_off_the_series_grid_or_card_is_refused(series: dict, tmp_path: Path):
    from UNet3DSegmentLib.base.errors import BadModelError
    from UNet3DSegmentLib.engine.dicom_seg import write_dicom_seg
    from UNet3DSegmentLib.engine.image_io import read_image

    folder, _ = series["ct"]
    card = card_from_dict(TINY_CARD)
    image = read_image(folder)
    labels = sitk.GetImageFromArray(synthetic_labels(SHAPE))
    labels.CopyInformation(image)
    shifted = sitk.Image(labels)
    shifted.SetOrigin(tuple(np.add(image.GetOrigin(), (0.0, 0.0, 1.4))))  # half a slice off
    with pytest.raises(BadInputError, match="matches no image of the DICOM series"):
        write_dicom_seg(shifted, folder, tmp_path / "a.dcm", card)
    with pytest.raises(BadInputError, match=r"shape \(4, 16, 16\)"):
        write_dicom_seg(synthetic_labels(SHAPE)[:4], folder, tmp_path / "a.dcm", card)
    few = copy.deepcopy(TINY_CARD)
    few["classes"] = few["classes"][:2]
    with pytest.raises(BadModelError, match="holds label 3 but the model card names only 2 classes"):
        write_dicom_seg(labels, folder, tmp_path / "a.dcm", card_from_dict(few))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [[1, 0, 0, 0, 1], [1, 0, 0, float("nan"), 1, 0], [1, 0, 0, 1, 0, 0]])
def test_malformed_orientation_is_one_bad_input_line(series: dict, tmp_path: Path, value):
    """A hostile or broken ImageOrientationPatient (wrong count, not a number, parallel axes): exit 3, no crash."""
    import shutil

    import pydicom

    from UNet3DSegmentLib.base.errors import BadInputError
    from UNet3DSegmentLib.engine.dicom_seg import read_dicom_source

    folder = tmp_path / "broken"
    shutil.copytree(series["ct"][0], folder)
    first = sorted(folder.iterdir())[0]
    dataset = pydicom.dcmread(first)
    dataset.ImageOrientationPatient = value
    dataset.save_as(first)
    with pytest.raises(BadInputError, match=r"ImageOrientationPatient") as raised:
        read_dicom_source(folder)
    assert "\n" not in str(raised.value)
