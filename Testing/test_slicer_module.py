"""The Slicer module file executed: panel, Segment/Cancel, errors, installs, scene close, self-test entry points.

``UNet3DSegment/UNet3DSegment.py`` runs here against stand-ins of what each Slicer line gives a
scripted module (``Testing/slicer_standins``: qt, ctk, slicer.util, ScriptedLoadableModule,
parameterNodeWrapper, slicer.packaging on 5.12+) over Slicer's real MRML (slicer-core). The panel is
built from the real ``.ui`` file; the engine child is ``Testing/slicer_standins/fake_engine.py``
standing in for ``PythonSlicer -m UNet3DSegmentLib segment`` (no TensorFlow), except in the one test
that runs the real engine with the tiny model. Tests assert what the panel shows, what reaches the
scene, and which Slicer functions were called.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import slicer_standins
from slicer_standins import qt as qtStandIn

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the stand-in PythonSlicer is a shell script")

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "UNet3DSegment" / "UNet3DSegment.py"
FAKE_ENGINE = Path(slicer_standins.__file__).with_name("fake_engine.py")


def load_module_file():
    """Import the module file fresh (after the stand-ins are in place), as Slicer's module loader does."""
    spec = importlib.util.spec_from_file_location("UNet3DSegment", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["UNet3DSegment"] = module
    spec.loader.exec_module(module)
    return module


class Panel:
    """The module's widget in a stand-in Slicer, with helpers that act as a user would."""

    def __init__(self, standIn, module, widget) -> None:
        self.standIn, self.module, self.widget = standIn, module, widget
        self.ui = widget.ui

    @property
    def parameters(self):
        return self.widget._parameterNode

    def press_segment(self) -> None:
        self.ui.segmentButton.click()

    def wait_until_idle(self, timeout: float = 60.0) -> None:
        qtStandIn.drive_timers(lambda: self.widget._job is None, timeout=timeout)

    def segment_and_wait(self) -> None:
        self.press_segment()
        assert self.widget._job is not None, self.ui.statusLabel.text
        self.wait_until_idle()

    def segmentations(self) -> list:
        scene = self.standIn.scene
        nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
        return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def add_volume(name: str = "T1", shape=(12, 14, 16), spacing=(1.0, 1.5, 2.0)):
    import slicer

    values = np.add.outer(np.add.outer(np.arange(shape[0]), np.arange(shape[1])), np.arange(shape[2]))
    node = slicer.util.addVolumeFromArray(values.astype(np.float32), name=name)
    node.SetSpacing(*spacing)
    return node


@pytest.fixture(params=["5.8", "5.10", "5.12"])
def line(request) -> str:
    return request.param


@pytest.fixture()
def standIn(monkeypatch, tmp_path, line):
    state = slicer_standins.install(monkeypatch, line, tmp_path)
    launcher = Path(state.app.slicerHome) / "bin" / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_ENGINE}" "$@"\n')
    launcher.chmod(0o755)
    monkeypatch.setenv("FAKE_ENGINE", "ok")
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(tmp_path / "engine_argv.jsonl"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no real PythonSlicer on PATH
    yield state
    assert state.app.cursorDepth == 0, "the wait cursor was left on"


@pytest.fixture()
def module(standIn):
    loaded = load_module_file()
    yield loaded
    sys.modules.pop("UNet3DSegment", None)


@pytest.fixture()
def panel(standIn, module):
    volume = add_volume()
    widget = module.UNet3DSegmentWidget(slicer_standins.mrml_widgets.qMRMLWidget())
    widget.setup()
    widget.parent.isEntered = True
    widget.enter()
    result = Panel(standIn, module, widget)
    result.volume = volume
    yield result
    widget.exit()
    widget.cleanup()


def engine_argv(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "engine_argv.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------
# Setup and the panel


def test_setup_builds_the_panel_from_the_ui_file_and_binds_every_parameter(panel):
    ui = panel.ui
    assert ui.inputVolumeSelector0.currentNode() is panel.volume
    assert panel.parameters.inputVolume0 is panel.volume
    assert Path(ui.modelPathLineEdit.currentPath).name == "brain_tissue_demo.keras"
    assert "brain-tissue" in ui.modelCardLabel.text.lower() or "brain" in ui.modelCardLabel.text.lower()
    assert [ui.deviceComboBox.itemText(i) for i in range(ui.deviceComboBox.count)][0].lower().startswith("auto")
    assert ui.segmentButton.enabled and ui.segmentButton.text == "Segment"
    assert [ui.inputVolumeSelector1.visible, ui.inputVolumeLabel0.text] == [False, "Input volume:"]
    assert panel.standIn.slotErrors() == []


def test_module_metadata_names_the_extension_repository(standIn, module):
    parent = slicer_standins.scripted_module._ModuleParent()
    module.UNet3DSegment(parent)
    assert parent.title == "UNet3D Segment"
    assert parent.categories == ["Segmentation"]
    assert "https://github.com/UNet3DSegment/SlicerUNet3DSegment#readme" in parent.helpText


# ---------------------------------------------------------------------------------------------
# Segment: success, output node, table, log, Show 3D


@pytest.fixture()
def coldPanel(panel):
    """The panel with the engine started per run (the fake engine speaks ``segment``'s protocol only)."""
    panel.widget.logic.keepEngineWarm = False
    return panel


def segment_volumes_ml(node, volume) -> dict[str, float]:
    import slicer

    segmentation = node.GetSegmentation()
    voxel = float(np.prod(volume.GetSpacing())) / 1000.0
    return {segmentation.GetNthSegment(i).GetName(): float(
        (slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentation.GetNthSegmentID(i), volume) > 0).sum()) * voxel
        for i in range(segmentation.GetNumberOfSegments())}


def test_segment_fills_the_output_selector_table_log_and_show3d_and_a_rerun_updates_the_same_node(
        coldPanel, tmp_path):
    panel, ui = coldPanel, coldPanel.ui
    assert ui.outputSegmentationSelector.currentNode() is None
    panel.segment_and_wait()

    [node] = panel.segmentations()
    assert ui.statusLabel.text == f"Done: 3 segments in '{node.GetName()}'."
    assert ui.progressBar.value == 100 and ui.segmentButton.text == "Segment"
    assert panel.parameters.outputSegmentation is node
    assert ui.outputSegmentationSelector.currentNode() is node
    # Table: the card's names and colours, volumes equal to voxel counts x voxel volume.
    expected = segment_volumes_ml(node, panel.volume)
    table = ui.segmentsTableWidget
    assert table.visible and table.headers() == ["Segment", "Colour", "Volume (mL)"]
    assert [row[0] for row in table.cells()] == ["CSF", "Grey matter", "White matter"]
    assert [float(row[2]) for row in table.cells()] == pytest.approx([expected[n] for n in expected], abs=0.006)
    assert all(v > 0 for v in expected.values())
    colour = node.GetSegmentation().GetNthSegment(0).GetColor()
    assert table.item(0, 1).background.rgb == tuple(round(c * 255) for c in colour)
    # Log: stages and the engine's own output, not only the last line.
    log = ui.logTextEdit.toPlainText()
    assert "fake engine: ok run on 1 input(s)" in log and "Engine output:" in log
    assert log.index("Loading") < log.index("Segmenting: 1/4 patches") < log.index("Done: 3 segments")
    # Show 3D: enabled for the result; pressing it builds closed surfaces.
    assert ui.show3DButton.enabled and not ui.show3DButton.checked
    ui.show3DButton.click()
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")

    panel.segment_and_wait()  # re-run: same node, no question asked
    assert panel.segmentations() == [node]
    assert panel.standIn.called("confirmOkCancelDisplay") == []
    assert node.GetSegmentation().GetNumberOfSegments() == 3
    assert panel.standIn.slotErrors() == []
    assert len(engine_argv(tmp_path)) == 2


def test_replacing_segments_the_panel_did_not_make_asks_first_without_the_wait_cursor(coldPanel):
    import slicer

    panel, ui = coldPanel, coldPanel.ui
    mine = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Manual")
    mine.CreateDefaultDisplayNodes()
    mine.GetSegmentation().AddEmptySegment("tumour", "tumour")
    ui.outputSegmentationSelector.userSelects(mine)
    assert panel.parameters.outputSegmentation is mine

    panel.standIn.answers = [False]
    panel.press_segment()
    assert panel.widget._job is None
    assert panel.standIn.called("confirmOkCancelDisplay") == ["Replace the 1 segments of 'Manual' with the result?"]
    assert panel.standIn.called("cursorDepthAtDialog") == [0]
    assert [mine.GetSegmentation().GetNthSegment(0).GetName()] == ["tumour"]

    panel.standIn.answers = [True]
    panel.segment_and_wait()
    names = [mine.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)]
    assert names == ["CSF", "Grey matter", "White matter"] and panel.segmentations() == [mine]


def test_panel_overlap_starts_at_the_model_choice_and_sends_none(coldPanel, tmp_path):
    """The overlap box opens on "Model's choice" (the card's recommendation): no --overlap is sent."""
    panel, ui = coldPanel, coldPanel.ui
    assert ui.overlapSpinBox.text == "Model's choice" and panel.parameters.overlap == -0.05
    panel.segment_and_wait()
    [argv] = engine_argv(tmp_path)
    assert "--overlap" not in argv, argv


def test_panel_choices_reach_the_engine_command_line(coldPanel, tmp_path):
    panel, ui = coldPanel, coldPanel.ui
    ui.overlapSpinBox.value = 0.25
    ui.batchSizeSpinBox.value = 3
    ui.ttaCheckBox.click()
    ui.largestComponentCheckBox.click()
    ui.deviceComboBox.userSelects(next(ui.deviceComboBox.itemText(i) for i in range(ui.deviceComboBox.count)
                                       if ui.deviceComboBox.itemText(i).lower().startswith("cpu")))
    ui.gpuMemoryLimitLineEdit.userTypes("6G")
    assert (panel.parameters.overlap, panel.parameters.batchSize, panel.parameters.tta) == (0.25, 3, True)
    panel.segment_and_wait()
    [argv] = engine_argv(tmp_path)
    assert argv[:3] == ["-m", "UNet3DSegmentLib", "segment"]
    joined = " ".join(argv)
    for expected in ("--overlap 0.25", "--batch-size 3", "--tta", "--device cpu", "--progress json"):
        assert expected in joined, joined
    assert "--gpu-memory-limit" in joined and str(6 * 1024 ** 3) in joined or "6G" in joined or "6.0G" in joined
    assert argv[argv.index("--model") + 1].endswith("brain_tissue_demo.keras")


# ---------------------------------------------------------------------------------------------
# Failures and cancel


@pytest.mark.parametrize("scenario, expected", [
    ("bad_input", "input volume is empty; load a volume with image data"),
    ("bad_model", "model card lists 3 classes but the model outputs 4; fix the card"),
    ("oom", "out of memory on the GPU at batch 1; use the CPU device"),
    ("crash", "ZeroDivisionError: division by zero"),
    ("killed", "the engine was killed (most likely out of memory)"),
])
def test_each_engine_failure_is_one_clear_line_and_leaves_the_scene_alone(coldPanel, monkeypatch, scenario, expected):
    panel, ui = coldPanel, coldPanel.ui
    monkeypatch.setenv("FAKE_ENGINE", scenario)
    nodes = panel.standIn.scene.GetNumberOfNodes()
    panel.segment_and_wait()
    assert ui.statusLabel.text.startswith("Failed: ") and expected in ui.statusLabel.text
    assert "\n" not in ui.statusLabel.text
    [shown] = panel.standIn.called("errorDisplay")
    assert shown.startswith("Segmentation failed.") and expected in shown
    assert panel.standIn.scene.GetNumberOfNodes() == nodes
    assert ui.segmentButton.text == "Segment" and ui.segmentButton.enabled
    assert ui.inputsCollapsibleButton.enabled and not ui.segmentsTableWidget.visible


def test_cancel_mid_run_leaves_scene_and_temporary_folder_as_they_were(coldPanel, monkeypatch):
    panel, ui = coldPanel, coldPanel.ui
    monkeypatch.setenv("FAKE_ENGINE", "hang")
    nodes = panel.standIn.scene.GetNumberOfNodes()
    panel.press_segment()
    assert ui.segmentButton.text == "Cancel" and not ui.inputsCollapsibleButton.enabled
    qtStandIn.drive_timers(lambda: "1/50 patches" in ui.statusLabel.text, timeout=30)
    ui.segmentButton.click()
    assert ui.segmentButton.text == "Cancelling..." and not ui.segmentButton.enabled
    panel.wait_until_idle(timeout=30)
    assert ui.statusLabel.text == "Cancelled: the scene was left as it was."
    assert ui.progressBar.value == 0 and ui.segmentButton.text == "Segment"
    assert panel.standIn.scene.GetNumberOfNodes() == nodes
    assert list(panel.widget.logic.temporaryRoot.glob("UNet3DSegment-*")) == []
    assert "Cancel requested." in ui.logTextEdit.toPlainText()
    assert panel.standIn.called("errorDisplay") == []


def test_scene_close_during_a_run_cancels_it_and_the_panel_starts_over(coldPanel, monkeypatch):
    import slicer

    panel, ui = coldPanel, coldPanel.ui
    monkeypatch.setenv("FAKE_ENGINE", "hang")
    panel.press_segment()
    qtStandIn.drive_timers(lambda: "1/50 patches" in ui.statusLabel.text, timeout=30)
    job = panel.widget._job
    slicer.mrmlScene.Clear(0)
    assert panel.widget._job is None and job.finished
    assert panel.segmentations() == []
    assert ui.statusLabel.text == "Cancelled: the scene was left as it was."
    assert panel.widget._parameterNode is not None  # re-made after the close (the module is entered)
    assert ui.segmentButton.text == "Segment" and not ui.segmentButton.enabled  # no volume any more
    assert list(panel.widget.logic.temporaryRoot.glob("UNet3DSegment-*")) == []
    volume = add_volume("Next")
    panel.widget.initializeParameterNode()
    assert panel.parameters.inputVolume0 is volume and ui.segmentButton.enabled


# ---------------------------------------------------------------------------------------------
# Dependencies on each Slicer line


def _missing(monkeypatch, names):
    from UNet3DSegmentLib.client import dependencies

    monkeypatch.setattr(dependencies, "missing_modules", lambda python=None, modules=(), env=None: list(names))


def test_install_dependencies_works_on_every_slicer_line(standIn, module, line):
    logic = module.UNet3DSegmentLogic()
    logic.installDependencies(["tensorflow>=2.16"])
    if line == "5.12":
        [call] = standIn.called("pip_ensure")
        assert call["requirements"] == ["tensorflow>=2.16"] and call["prompt_install"] is False
        assert call["requester"] == "UNet3DSegment" and "numpy==" in call["constraints"]
        assert standIn.called("pip_install") == []
    else:
        [call] = standIn.called("pip_install")
        assert call[0] == "-c" and call[-1] == "tensorflow>=2.16"
        assert standIn.called("pip_ensure") == []


def test_first_segment_installs_what_is_missing_then_runs(coldPanel, monkeypatch, line):
    panel = coldPanel
    _missing(monkeypatch, ["tensorflow"])
    panel.standIn.answers = [True]
    panel.segment_and_wait()
    [question] = panel.standIn.called("confirmOkCancelDisplay")
    assert "needs tensorflow" in question and "Install now?" in question
    assert panel.standIn.called("cursorDepthAtDialog") == [0]
    installs = panel.standIn.called("pip_ensure" if line == "5.12" else "pip_install")
    assert len(installs) == 1
    assert panel.ui.statusLabel.text.startswith("Done: 3 segments")
    assert "Installed." in panel.ui.logTextEdit.toPlainText()


def test_declined_install_runs_nothing(coldPanel, monkeypatch, tmp_path):
    _missing(monkeypatch, ["tensorflow"])
    coldPanel.standIn.answers = [False]
    coldPanel.press_segment()
    assert coldPanel.widget._job is None and engine_argv(tmp_path) == []
    assert coldPanel.standIn.called("pip_install") == coldPanel.standIn.called("pip_ensure") == []
    assert "Installation declined" in coldPanel.ui.logTextEdit.toPlainText()


def test_failing_pip_is_shown_and_nothing_starts(coldPanel, monkeypatch, tmp_path):
    _missing(monkeypatch, ["tensorflow"])
    coldPanel.standIn.answers = [True]
    coldPanel.standIn.pipFails = True
    coldPanel.press_segment()
    assert coldPanel.widget._job is None and engine_argv(tmp_path) == []
    [shown] = coldPanel.standIn.called("errorDisplay")
    assert shown.startswith("Failed to start the segmentation.") and "returned non-zero exit status 1" in shown
    assert [type(e).__name__ for e in coldPanel.standIn.slotErrors()] == ["CalledProcessError"]


def testing_mode_panel(standIn):
    """The panel in a Slicer started with ``--testing``, its engine started per run."""
    standIn.app.testing = True
    module = load_module_file()
    add_volume()
    widget = module.UNet3DSegmentWidget(slicer_standins.mrml_widgets.qMRMLWidget())
    widget.setup()
    widget.logic.keepEngineWarm = False
    return widget


def test_under_testing_nothing_is_installed(standIn, monkeypatch, tmp_path):
    widget = testing_mode_panel(standIn)
    _missing(monkeypatch, ["tensorflow"])
    widget.ui.segmentButton.click()
    [error] = standIn.slotErrors()
    assert "not installing during tests" in str(error)
    assert standIn.called("pip_install") == standIn.called("pip_ensure") == standIn.called("errorDisplay") == []
    widget.cleanup()


def test_torch_backend_without_the_pytorch_extension_names_it(coldPanel, monkeypatch):
    panel, ui = coldPanel, coldPanel.ui
    ui.backendComboBox.userSelects(next(ui.backendComboBox.itemText(i) for i in range(ui.backendComboBox.count)
                                        if "torch" in ui.backendComboBox.itemText(i).lower()))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the extension is not installed
    _missing(monkeypatch, ["keras", "torch"])
    panel.press_segment()
    [shown] = panel.standIn.called("errorDisplay")
    assert "install the PyTorch extension (SlicerPyTorch) from the Extensions Manager" in shown
    assert panel.standIn.called("confirmOkCancelDisplay") == [] and panel.widget._job is None
    assert panel.standIn.called("pip_install") == panel.standIn.called("pip_ensure") == []


def test_torch_backend_installs_pytorch_through_the_pytorch_extension(coldPanel, monkeypatch, line):
    panel, ui = coldPanel, coldPanel.ui
    ui.backendComboBox.userSelects(next(ui.backendComboBox.itemText(i) for i in range(ui.backendComboBox.count)
                                        if "torch" in ui.backendComboBox.itemText(i).lower()))
    torchCalls = slicer_standins.add_torch_extension(monkeypatch, panel.standIn)
    _missing(monkeypatch, ["keras", "torch"])
    panel.standIn.answers = [True]
    panel.segment_and_wait()
    assert torchCalls == [{"askConfirmation": False, "torchVersionRequirement": None}]
    [question] = panel.standIn.called("confirmOkCancelDisplay")
    assert "PyTorch extension (SlicerPyTorch)" in question
    if line == "5.12":
        [call] = panel.standIn.called("pip_ensure")
        assert call["requirements"] == ["keras>=3.11"]
    else:
        [call] = panel.standIn.called("pip_install")
        assert call[-1] == "keras>=3.11" and "torch" not in call
    assert panel.ui.statusLabel.text.startswith("Done")


def test_declined_pytorch_install_is_an_error_naming_the_extension(coldPanel, monkeypatch):
    panel, ui = coldPanel, coldPanel.ui
    ui.backendComboBox.userSelects(next(ui.backendComboBox.itemText(i) for i in range(ui.backendComboBox.count)
                                        if "torch" in ui.backendComboBox.itemText(i).lower()))
    slicer_standins.add_torch_extension(monkeypatch, panel.standIn, accept=False)
    _missing(monkeypatch, ["torch"])
    panel.standIn.answers = [True]
    panel.press_segment()
    [shown] = panel.standIn.called("errorDisplay")
    assert "the PyTorch extension did not install PyTorch" in shown and panel.widget._job is None


# ---------------------------------------------------------------------------------------------
# Model, Python, channels, enter/exit


def test_model_buttons_and_a_bad_model_path(coldPanel, tmp_path):
    ui = coldPanel.ui
    bundled = ui.modelPathLineEdit.currentPath
    ui.modelPathLineEdit.currentPath = str(tmp_path / "missing.keras")
    assert "not found" in ui.modelCardLabel.text and not ui.segmentButton.enabled
    assert ui.classesLabel.text == ""
    ui.bundledModelButton.click()
    assert ui.modelPathLineEdit.currentPath == bundled and ui.segmentButton.enabled
    assert "CSF" in ui.classesLabel.text


def test_python_browse_sets_the_engine_interpreter(coldPanel, tmp_path):
    panel, ui = coldPanel, coldPanel.ui
    qtStandIn.QFileDialog.ANSWERS[:] = [str(tmp_path / "python3")]
    ui.pythonBrowseButton.click()
    assert panel.parameters.pythonExecutable == str(tmp_path / "python3")
    assert ui.pythonExecutableLineEdit.text == str(tmp_path / "python3")
    qtStandIn.QFileDialog.ANSWERS[:] = [""]  # cancelled dialog: unchanged
    ui.pythonBrowseButton.click()
    assert panel.parameters.pythonExecutable == str(tmp_path / "python3")
    panel.press_segment()  # that interpreter does not exist: one clear line, nothing started
    [shown] = panel.standIn.called("errorDisplay")
    assert "not found" in shown and panel.widget._job is None


def write_card(folder: Path, channels: list[str]) -> Path:
    """An empty model file (never opened: the card is all the panel reads) with a card of ``channels``."""
    from conftest import TINY_CARD

    card = json.loads(json.dumps(TINY_CARD))
    card["input"]["channels"] = channels
    name = f"model{len(channels)}"
    model = folder / f"{name}.keras"
    model.write_bytes(b"")
    (folder / f"{name}.json").write_text(json.dumps(card))
    return model


def test_one_selector_per_channel_named_by_the_card(coldPanel, tmp_path):
    ui = coldPanel.ui
    ui.modelPathLineEdit.currentPath = str(write_card(tmp_path, ["T1", "FLAIR"]))
    assert [ui.inputVolumeSelector0.visible, ui.inputVolumeSelector1.visible, ui.inputVolumeSelector2.visible] == [
        True, True, False]
    assert [ui.inputVolumeLabel0.text, ui.inputVolumeLabel1.text] == ["T1 volume:", "FLAIR volume:"]
    assert not ui.segmentButton.enabled  # FLAIR not chosen yet
    ui.inputVolumeSelector1.userSelects(add_volume("FLAIR"))
    assert ui.segmentButton.enabled

    ui.modelPathLineEdit.currentPath = str(write_card(tmp_path, ["A", "B", "C", "D", "E"]))
    assert "takes 5 input volumes; the panel offers 4" in ui.statusLabel.text and not ui.segmentButton.enabled


def test_exit_disconnects_the_panel_and_enter_reconnects_it(coldPanel):
    panel, ui = coldPanel, coldPanel.ui
    panel.widget.exit()
    ui.batchSizeSpinBox.value = 7
    assert panel.parameters.batchSize != 7
    panel.widget.enter()
    assert ui.batchSizeSpinBox.value == panel.parameters.batchSize  # the node wins on re-entry
    ui.batchSizeSpinBox.value = 5
    assert panel.parameters.batchSize == 5


# ---------------------------------------------------------------------------------------------
# The .ui file is what the panel is built from: a renamed widget breaks it


def _ui_with(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "UNet3DSegment" / "Resources" / "UI" / "UNet3DSegment.ui").read_text()
    assert old in text
    path = tmp_path / "Resources" / "UI" / "UNet3DSegment.ui"
    path.parent.mkdir(parents=True)
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("old, new, error", [
    ('name="segmentButton"', 'name="applyButton"', AttributeError),
    ("<string>batchSize</string>", "<string>batch_size</string>", ValueError),
    ('class="QSpinBox" name="batchSizeSpinBox"', 'class="QLineEdit" name="batchSizeSpinBox"', RuntimeError),
])
def test_a_renamed_or_retyped_ui_widget_fails_setup(standIn, module, monkeypatch, tmp_path, old, new, error):
    path = _ui_with(tmp_path, old, new)
    monkeypatch.setattr(module.UNet3DSegmentWidget, "resourcePath", lambda self, name: str(path.parents[1] / name))
    add_volume()
    widget = module.UNet3DSegmentWidget(slicer_standins.mrml_widgets.qMRMLWidget())
    with pytest.raises(error):
        widget.setup()
    widget.removeObservers()  # what Slicer's module unloading does; the scene outlives this widget


# ---------------------------------------------------------------------------------------------
# The module's self-test, run through its own entry points


def test_self_test_entry_points_segment_and_cancel(standIn, module, monkeypatch):
    launcher = Path(standIn.app.slicerHome) / "bin" / "PythonSlicer"
    monkeypatch.setenv("UNET3DSEGMENT_TEST_PYTHON", str(launcher))
    monkeypatch.setenv("FAKE_ENGINE", "selftest")
    test = module.UNet3DSegmentTest()
    test.runTest()
    messages = standIn.called("delayDisplay")
    assert messages[0] == "Segmenting a synthetic brain with the bundled model"
    assert messages[1].startswith("Test passed: Dice 1.000, 1.000, 1.000, brain 1.000")
    assert messages[-1] == "Test passed"


# ---------------------------------------------------------------------------------------------
# The real engine (tiny model) behind the panel, warm between runs


@pytest.mark.parametrize("line", ["5.12"])  # one line is enough: TensorFlow's start-up is the cost here
def test_real_engine_through_the_panel_stays_warm_for_the_second_run(panel, tmp_path):
    import slicer
    from conftest import save_tiny_model

    panel, ui = panel, panel.ui
    model = save_tiny_model(tmp_path / "model")
    ui.modelPathLineEdit.currentPath = str(model)
    ui.pythonExecutableLineEdit.userTypes(sys.executable)  # the test's Python has TensorFlow
    assert panel.widget.logic.keepEngineWarm
    panel.segment_and_wait()
    assert ui.statusLabel.text.startswith("Done: 3 segments"), ui.statusLabel.text
    first = panel.widget.logic._warmEngine.pid
    [node] = panel.segmentations()
    before = {i: slicer.util.arrayFromSegmentBinaryLabelmap(node, node.GetSegmentation().GetNthSegmentID(i),
                                                             panel.volume).sum() for i in range(3)}
    panel.segment_and_wait()
    assert ui.statusLabel.text.startswith("Done: 3 segments"), ui.statusLabel.text
    assert panel.widget.logic._warmEngine.pid == first  # no second start-up
    after = {i: slicer.util.arrayFromSegmentBinaryLabelmap(node, node.GetSegmentation().GetNthSegmentID(i),
                                                            panel.volume).sum() for i in range(3)}
    assert after == before and panel.segmentations() == [node]
    voxel = float(np.prod(panel.volume.GetSpacing())) / 1000.0  # the table: the engine's own statistics
    assert [float(row[2]) for row in ui.segmentsTableWidget.cells()] == pytest.approx(
        [after[i] * voxel for i in range(3)], abs=0.006)
    panel.widget.cleanup()  # module unloaded: the warm engine goes
    assert panel.widget.logic._warmEngine is None
    assert not _alive(first)


def _alive(pid: int) -> bool:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie counts as gone
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return False
        except OSError:
            return False
        time.sleep(0.1)
    return True


def test_trusting_a_model_is_asked_and_reaches_the_engine(coldPanel, tmp_path):
    panel, ui = coldPanel, coldPanel.ui
    panel.standIn.answers = [False]
    ui.trustModelCheckBox.click()
    assert not panel.parameters.trustModel and not ui.trustModelCheckBox.checked
    [question] = panel.standIn.called("confirmOkCancelDisplay")
    assert question.startswith("Trust this model? A trusted SavedModel may run any TensorFlow operation")
    panel.segment_and_wait()
    assert "--trust-model" not in engine_argv(tmp_path)[-1]

    panel.standIn.answers = [True]
    ui.trustModelCheckBox.click()
    assert panel.parameters.trustModel and ui.trustModelCheckBox.checked
    panel.segment_and_wait()
    assert "--trust-model" in engine_argv(tmp_path)[-1]


def test_trust_is_never_taken_from_a_scene_and_a_decline_always_reaches_the_node(coldPanel, tmp_path):
    panel, ui = coldPanel, coldPanel.ui
    panel.parameters.trustModel = True  # as a loaded scene (or the console) could set it
    panel.widget.initializeParameterNode()  # what entering the module / loading a scene does
    assert not panel.parameters.trustModel and not ui.trustModelCheckBox.checked
    panel.standIn.answers = [False]
    ui.trustModelCheckBox.click()
    assert not panel.parameters.trustModel and not ui.trustModelCheckBox.checked
    panel.segment_and_wait()
    assert "--trust-model" not in engine_argv(tmp_path)[-1]


def test_an_edited_result_is_not_replaced_without_asking(coldPanel):
    panel, ui = coldPanel, coldPanel.ui
    panel.segment_and_wait()
    [node] = panel.segmentations()
    ui.show3DButton.click()  # building surfaces is not an edit
    panel.segment_and_wait()
    assert panel.standIn.called("confirmOkCancelDisplay") == []
    labelmap = node.GetSegmentation().GetNthSegment(0).GetRepresentation("Binary labelmap")
    labelmap.Modified()  # what a Segment Editor stroke does to the labelmap
    panel.standIn.answers = [False]
    panel.press_segment()
    assert panel.standIn.called("confirmOkCancelDisplay") == [
        f"Replace the 3 segments of '{node.GetName()}' with the result?"]
    assert panel.widget._job is None


def test_under_testing_a_replacement_runs_without_a_dialog(standIn, monkeypatch):
    import slicer

    widget = testing_mode_panel(standIn)
    mine = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Manual")
    mine.CreateDefaultDisplayNodes()
    mine.GetSegmentation().AddEmptySegment("tumour", "tumour")
    widget.ui.outputSegmentationSelector.userSelects(mine)
    widget.ui.segmentButton.click()
    qtStandIn.drive_timers(lambda: widget._job is None, timeout=60)
    assert mine.GetSegmentation().GetNumberOfSegments() == 3 and standIn.slotErrors() == []
    widget.cleanup()


def test_warm_engine_log_shows_each_runs_own_output_and_an_untied_error_ends_the_run(panel, monkeypatch):
    ui = panel.ui
    assert panel.widget.logic.keepEngineWarm
    panel.segment_and_wait()
    first = panel.widget.logic._warmEngine.pid
    panel.segment_and_wait()
    assert panel.widget.logic._warmEngine.pid == first  # served by the same warm child
    log = ui.logTextEdit.toPlainText()
    assert log.count("fake engine: ok run on 1 input(s)") == 1  # this run's output, not the earlier one's
    panel.widget.logic.shutdownEngine()
    monkeypatch.setenv("FAKE_ENGINE", "noid")
    panel.segment_and_wait()  # returns (no 10-minute wait for the idle timeout)
    assert ui.statusLabel.text == "Failed: request is not JSON; send one object per line"


def test_input_check_warnings_stay_visible_after_the_run(coldPanel, monkeypatch):
    monkeypatch.setenv("FAKE_ENGINE", "warn")
    coldPanel.segment_and_wait()
    status = coldPanel.ui.statusLabel.text
    assert status.startswith("Done: 3 segments") and status.endswith(
        "Warning: channel T1: background is not zero; skull-strip the input")
    assert "Warning: channel T1: background is not zero" in coldPanel.ui.logTextEdit.toPlainText()
