"""The MRML logic on slicer-core (headless): volume nodes in, segmentation node out, scene kept clean.

Two tiers. A stand-in engine (a small script in place of the Python interpreter, writing known labels
with SimpleITK) checks the MRML side exactly and fast: names, colours, terminology, subject
hierarchy, replace rules, failures leaving the scene as it was. The real engine (child process with
the tiny model) checks the whole path: an oblique anisotropic volume comes back aligned voxel for
voxel, progress arrives, and cancel mid-run leaves no node and no temporary file.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
from conftest import TINY_CARD, oblique_anisotropic_image
from slicer.util import arrayFromVolume

from UNet3DSegmentLib.client.engine_process import MODULE_DIR
from UNet3DSegmentLib.base.errors import BadInputError, BadModelError, CancelledError
from UNet3DSegmentLib.engine.card import load_card
from UNet3DSegmentLib.mrml.headless import startHeadlessApplication
from UNet3DSegmentLib.mrml.logic import SegmentationJob, UNet3DSegmentLogic

SLICER_DEFAULT_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~SCT^85756007^Tissue~^^"
    "~Anatomic codes - DICOM master list~^^~^^"
)

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the stand-in engine is started through its shebang")

STAND_IN_ENGINE = textwrap.dedent(
    '''
    import json, sys
    import numpy as np
    import SimpleITK as sitk

    args = sys.argv[1:]
    assert args[:3] == ["-m", "UNet3DSegmentLib", "segment"], args
    mode = args[args.index("--stand-in") + 1] if "--stand-in" in args else "ok"
    with open(args[args.index("--record") + 1], "w") as f:
        json.dump(args, f)
    inputs = args[3:args.index("-o")]
    output = args[args.index("-o") + 1]

    def emit(**event):
        print(json.dumps(event), flush=True)

    emit(stage="load", done=0, total=0, seconds=0.0, message="reading")
    emit(stage="inference", done=1, total=2, seconds=0.1, message="patch 1/2")
    emit(stage="inference", done=2, total=2, seconds=0.2, message="patch 2/2")
    if mode == "fail":
        emit(stage="error", done=0, total=0, seconds=0.3, kind="bad-input",
             message="input volume is empty; choose another", exit_code=3)
        sys.exit(3)
    image = sitk.ReadImage(inputs[0])
    array = sitk.GetArrayFromImage(image)
    labels = np.zeros(array.shape, np.uint8)
    labels[array > 110] = 1
    labels[array > 130] = 2
    labels[array < 70] = 9 if mode == "bad-label" else 3
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(image)
    sitk.WriteImage(result, output, True)
    emit(stage="done", done=2, total=2, seconds=0.4, message="", output=output)
    '''
)


class HeadlessSlicer:
    """What Slicer's application sets up (``mrml/headless.py``), with helpers to load volumes and list nodes."""

    def __init__(self) -> None:
        self.application = startHeadlessApplication()
        self.scene = self.application.scene
        composites = self.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        self.slice_composite = composites.GetItemAsObject(0)

    def node_ids(self) -> set[str]:
        return {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}

    def load_volume(self, path: Path, name: str = "input"):
        """Load like Slicer does (archetype storage node), and file it under a patient and a study."""
        volume = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        assert storage.ReadData(volume)
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient")
        study = hierarchy.CreateStudyItem(patient, "Study")
        hierarchy.CreateItem(study, volume)
        return volume


def exported_labels(segmentation_node, reference_volume) -> tuple[np.ndarray, np.ndarray]:
    """The segmentation as a labelmap on the reference grid (label = segment index + 1), and its IJK->RAS."""
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    segmentation_node.GetScene().AddNode(labelmap)
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap, reference_volume
    )
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(matrix)
    array = arrayFromVolume(labelmap).copy()
    segmentation_node.GetScene().RemoveNode(labelmap)
    return array, np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(volume) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def stand_in_labels(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image)
    labels = np.zeros(array.shape, np.uint8)
    labels[array > 110] = 1
    labels[array > 130] = 2
    labels[array < 70] = 3
    return labels


@pytest.fixture()
def app() -> HeadlessSlicer:
    return HeadlessSlicer()


@pytest.fixture()
def image_file(tmp_path: Path) -> tuple[Path, sitk.Image]:
    image = oblique_anisotropic_image()
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    return path, image


@pytest.fixture()
def stand_in(tmp_path: Path) -> Path:
    """An executable that takes the interpreter's place and behaves like the engine."""
    path = tmp_path / "stand_in_python"
    path.write_text(f"#!{sys.executable}\n" + STAND_IN_ENGINE)
    path.chmod(0o755)
    return path


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    """A model file the stand-in never opens, with the tiny model's card beside it."""
    path = tmp_path / "models" / "tiny.keras"
    path.parent.mkdir()
    path.write_bytes(b"")
    (path.parent / "tiny.json").write_text(json.dumps(TINY_CARD))
    return path


@pytest.fixture()
def logic(app: HeadlessSlicer, tmp_path: Path) -> UNet3DSegmentLogic:
    return UNet3DSegmentLogic(scene=app.scene, temporaryRoot=tmp_path / "temp")


def leftovers(logic: UNet3DSegmentLogic) -> list[str]:
    root = logic.temporaryRoot
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ---------------------------------------------------------------------------------------------
# Stand-in engine: the MRML side, exactly


def test_new_segmentation_carries_the_cards_classes(app, logic, image_file, stand_in, model_path, tmp_path):
    path, image = image_file
    volume = app.load_volume(path)
    record = tmp_path / "args.json"
    events = []
    node = logic.segment(volume, model=model_path, pythonExecutable=stand_in, progress=events.append,
                         extraArguments=["--record", str(record)], overlap=0.25, device="cpu")

    card = load_card(model_path.with_suffix(".json"))
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    for index, info in enumerate(card.classes[1:]):
        segment = segmentation.GetNthSegment(index)
        assert segment.GetName() == info.name
        assert segment.GetColor() == pytest.approx(info.rgb01, abs=1e-6)
        assert segment.GetLabelValue() == index + 1
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
        tag = vtk.mutable("")
        assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
        # A class without codes keeps the default every new Slicer segment has (Tissue).
        expected = info.terminology.to_slicer_string() if info.terminology else SLICER_DEFAULT_TERMINOLOGY
        assert str(tag) == expected
    assert card.classes[1].terminology is not None and card.classes[2].terminology is None

    # The terminology string is one Slicer itself parses back into the same codes.
    entry = slicer.vtkSlicerTerminologyEntry()
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    csf = segmentation.GetNthSegment(0)
    csf_tag = vtk.mutable("")
    csf.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), csf_tag)
    assert terminologies.DeserializeTerminologyEntry(str(csf_tag), entry)
    assert entry.GetTypeObject().GetCodeValue() == "65216001"
    assert entry.GetCategoryObject().GetCodingSchemeDesignator() == "SCT"

    labels, matrix = exported_labels(node, volume)
    np.testing.assert_array_equal(labels, stand_in_labels(image))
    np.testing.assert_allclose(matrix, ijk_to_ras(volume), atol=1e-9)

    assert node.GetName() == f"input {card.name}"
    assert node.GetDisplayNode() is not None and node.GetDisplayNode().GetVisibility()
    assert app.slice_composite.GetBackgroundVolumeID() == volume.GetID()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == hierarchy.GetItemParent(
        hierarchy.GetItemByDataNode(volume)
    )
    assert hierarchy.GetItemLevel(hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node))) == "Study"
    reference = node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    assert reference is volume

    args = json.loads(record.read_text())
    assert args[args.index("--model") + 1] == str(model_path)
    assert args[args.index("--overlap") + 1] == "0.25" and args[args.index("--device") + 1] == "cpu"
    assert args[-2:] == ["--progress", "json"]
    assert [e["stage"] for e in events] == ["load", "inference", "inference", "done"]
    assert leftovers(logic) == []


def test_volume_under_a_transform_gets_a_segmentation_under_it(app, logic, image_file, stand_in, model_path,
                                                               tmp_path):
    path, image = image_file
    volume = app.load_volume(path)
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 40.0)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    node = logic.segment([volume], model=model_path, pythonExecutable=stand_in,
                         extraArguments=["--record", str(tmp_path / "a.json")])
    assert node.GetTransformNodeID() == transform.GetID()
    labels, matrix = exported_labels(node, volume)
    np.testing.assert_array_equal(labels, stand_in_labels(image))
    np.testing.assert_allclose(matrix, ijk_to_ras(volume), atol=1e-9)


def test_existing_segmentation_is_untouched_unless_asked(app, logic, image_file, stand_in, model_path, tmp_path):
    volume = app.load_volume(image_file[0])
    existing = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    existing.CreateDefaultDisplayNodes()
    existing.GetSegmentation().AddEmptySegment("kidney", "Kidney", [0.1, 0.2, 0.3])
    before = app.node_ids()
    with pytest.raises(BadInputError, match="already exists .1 segments.; pass replaceExisting=True"):
        logic.segment(volume, existing, model=model_path, pythonExecutable=stand_in,
                      extraArguments=["--record", str(tmp_path / "a.json")])
    assert not (tmp_path / "a.json").exists()  # refused before the engine started
    assert app.node_ids() == before
    assert existing.GetSegmentation().GetNumberOfSegments() == 1
    assert existing.GetSegmentation().GetNthSegment(0).GetName() == "Kidney"
    assert leftovers(logic) == []

    result = logic.segment(volume, existing, model=model_path, pythonExecutable=stand_in, replaceExisting=True,
                           extraArguments=["--record", str(tmp_path / "b.json")])
    assert result is existing
    assert app.node_ids() == before
    names = [existing.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)]
    assert names == ["CSF", "Grey matter", "White matter"]
    assert existing.GetSegmentation().GetSegment("kidney") is None


@pytest.mark.parametrize(
    ("mode", "error_type", "message"),
    [
        ("fail", BadInputError, "input volume is empty; choose another"),
        ("bad-label", BadModelError, "the result has label 9 but model card tiny-test-model lists 4 classes"),
    ],
)
def test_failure_leaves_the_scene_as_it_was(app, logic, image_file, stand_in, model_path, tmp_path, mode,
                                             error_type, message):
    volume = app.load_volume(image_file[0])
    existing = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    existing.GetSegmentation().AddEmptySegment("kidney", "Kidney", [0.1, 0.2, 0.3])
    for output, replace in [(None, False), (existing, True)]:
        before = app.node_ids()
        with pytest.raises(error_type) as caught:
            logic.segment(volume, output, model=model_path, pythonExecutable=stand_in, replaceExisting=replace,
                          extraArguments=["--stand-in", mode, "--record", str(tmp_path / "a.json")])
        assert str(caught.value).startswith(message)
        assert app.node_ids() == before
        assert [existing.GetSegmentation().GetNthSegment(i).GetName() for i in range(1)] == ["Kidney"]
        assert existing.GetSegmentation().GetNumberOfSegments() == 1
        assert leftovers(logic) == []


def test_non_blocking_job_is_polled_to_the_result(app, logic, image_file, stand_in, model_path, tmp_path):
    volume = app.load_volume(image_file[0])
    job = logic.segment(volume, model=model_path, pythonExecutable=stand_in, waitForCompletion=False,
                        extraArguments=["--record", str(tmp_path / "a.json")])
    assert isinstance(job, SegmentationJob)
    with pytest.raises(BadInputError, match="still running"):
        job.result()
    polls = 0
    while not job.poll():
        polls += 1
        time.sleep(0.01)
    assert job.error is None and job.result() is job.segmentationNode
    assert job.segmentationNode.GetSegmentation().GetNumberOfSegments() == 3
    assert job.poll() is True  # idempotent
    assert leftovers(logic) == []


def test_saved_model_picked_by_its_pb_file_stands_for_the_folder(app, logic, image_file, stand_in, tmp_path):
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"")
    card = json.loads(json.dumps(TINY_CARD))
    card["classes"][1]["name"] = "Ventricles"
    (tmp_path / "exported.json").write_text(json.dumps(card))
    record = tmp_path / "args.json"
    node = logic.segment(app.load_volume(image_file[0]), model=folder / "saved_model.pb", pythonExecutable=stand_in,
                         extraArguments=["--record", str(record)])
    args = json.loads(record.read_text())
    assert args[args.index("--model") + 1] == str(folder)
    assert node.GetSegmentation().GetNthSegment(0).GetName() == "Ventricles"


def test_model_without_card_gets_numbered_classes_for_every_label(app, logic, image_file, stand_in, tmp_path):
    model = tmp_path / "bare.keras"
    model.write_bytes(b"")
    node = logic.segment(app.load_volume(image_file[0]), model=model, pythonExecutable=stand_in,
                         extraArguments=["--stand-in", "bad-label", "--record", str(tmp_path / "a.json")])
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == [f"Class {i}" for i in range(1, 10)]  # the stand-in wrote labels 1, 2 and 9


def test_cancel_requested_after_the_child_succeeded_still_imports_nothing(app, logic, image_file, stand_in,
                                                                         model_path, tmp_path):
    volume = app.load_volume(image_file[0])
    before = app.node_ids()
    job = logic.segment(volume, model=model_path, pythonExecutable=stand_in, waitForCompletion=False,
                        extraArguments=["--record", str(tmp_path / "a.json")])
    assert job.process.wait(timeout=60) == 0  # the child is done, the result not yet imported
    job.requestCancel()
    while not job.poll():
        time.sleep(0.01)
    assert isinstance(job.error, CancelledError)
    assert app.node_ids() == before
    assert leftovers(logic) == []


def test_inputs_are_checked_before_anything_runs(app, logic, image_file, stand_in, model_path, tmp_path):
    volume = app.load_volume(image_file[0])
    before = app.node_ids()
    with pytest.raises(BadInputError, match=r"takes 1 input volume\(s\) \(T1\), got 2"):
        logic.segment([volume, volume], model=model_path, pythonExecutable=stand_in)
    with pytest.raises(BadInputError, match="has no image data"):
        logic.segment(app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"), model=model_path)
    with pytest.raises(BadModelError, match="not found; choose a .keras or .h5 file"):
        logic.segment(volume, model=tmp_path / "missing.keras")
    with pytest.raises(BadInputError, match="not found; choose an existing interpreter"):
        logic.segment(volume, model=model_path, pythonExecutable=tmp_path / "no-python")
    assert app.node_ids() - before == {app.scene.GetFirstNodeByName("empty").GetID()}
    assert leftovers(logic) == []


# ---------------------------------------------------------------------------------------------
# The real engine in a child process, with the tiny model


def run_engine_in_process(input_path: Path, output: Path, model: Path) -> np.ndarray:
    """The engine on the original file, without Slicer in between: the reference result."""
    from UNet3DSegmentLib.engine.pipeline import segment_files

    segment_files([input_path], output, model=model)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(output)))


def test_real_engine_result_is_aligned_voxel_for_voxel(app, logic, image_file, tiny_model_path, tmp_path):
    model_path = tiny_model_path
    path, image = image_file
    volume = app.load_volume(path)
    events = []
    node = logic.segment(volume, model=model_path, progress=events.append, extraArguments=["--threads", "1"])

    expected = run_engine_in_process(path, tmp_path / "direct.nrrd", model_path)
    labels, matrix = exported_labels(node, volume)
    assert labels.shape == image.GetSize()[::-1]
    np.testing.assert_array_equal(labels, expected)
    assert len(np.unique(expected)) >= 2  # the random tiny model does split the volume
    np.testing.assert_allclose(matrix, ijk_to_ras(volume), atol=1e-9)
    names = [node.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)]
    assert names == [c["name"] for c in TINY_CARD["classes"][1:]]

    stages = [e["stage"] for e in events]
    assert stages[0] == "load" and stages[-1] == "done"
    patches = [e for e in events if e["stage"] == "inference"]
    assert patches and patches[-1]["done"] == patches[-1]["total"] > 0
    assert leftovers(logic) == []


def test_real_engine_cancel_mid_run_leaves_nothing(app, logic, tmp_path, tiny_model_path):
    model_path = tiny_model_path
    big = oblique_anisotropic_image(shape_zyx=(40, 56, 56), seed=3)
    sitk.WriteImage(big, str(tmp_path / "big.nrrd"))
    volume = app.load_volume(tmp_path / "big.nrrd")
    before = app.node_ids()
    events = []
    job = logic.segment(volume, model=model_path, overlap=0.9, batchSize=1, tta=True, waitForCompletion=False,
                        progress=events.append, extraArguments=["--threads", "1"])
    deadline = time.monotonic() + 120
    while not any(e["stage"] == "inference" for e in events):
        assert not job.poll(), f"finished before it could be cancelled: {job.error}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pid = job.process.pid
    job.requestCancel()  # what the panel's Cancel button does; its timer keeps polling
    while not job.poll():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert job.process.returncode == 5  # the engine stopped on SIGTERM, cleaned up, exited "cancelled"
    assert job.finished and isinstance(job.error, CancelledError)
    with pytest.raises(CancelledError):
        job.result()
    assert events[-1]["stage"] != "done"
    assert app.node_ids() == before
    assert leftovers(logic) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_engine_module_dir_is_the_modules_folder() -> None:
    assert (MODULE_DIR / "UNet3DSegmentLib" / "mrml" / "logic.py").is_file()
