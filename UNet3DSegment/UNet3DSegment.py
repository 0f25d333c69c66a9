import contextlib
import os
import pathlib
import time
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    WithinRange,
)

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from UNet3DSegmentLib.base.errors import BadInputError, CancelledError, UNet3DSegmentError
from UNet3DSegmentLib.client import dependencies, install, panel_text, phantom
from UNet3DSegmentLib.client.engine_process import slicer_python
from UNet3DSegmentLib.client.panel_options import choiceEnum, default, options_from_parameters, panel_range
from UNet3DSegmentLib.mrml.logic import UNet3DSegmentLogic as SegmentationLogicBase
from UNet3DSegmentLib.mrml.logic import resultFingerprint

MAX_CHANNELS = 4  # input selectors in the panel; the Python API takes any number
RESULT_ATTRIBUTE = "UNet3DSegment.Result"  # on the panel's own result, as left: a re-run replaces it unasked
LOG_LINES_KEPT = 5000
SEGMENT_TABLE_HEADERS = ["Segment", "Colour", "Volume (mL)"]


#
# UNet3DSegment
#


class UNet3DSegment(ScriptedLoadableModule):
    """Segment volumes with a Keras 3D U-Net (sliding-window inference in a child process)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("UNet3D Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["UNet3DSegment developers"]
        self.parent.helpText = _("""
Segment the loaded volume with a Keras 3D U-Net by sliding-window patch inference on the GPU or CPU.
The result is a segmentation with the model card's segment names, colours and terminology.
Inference runs in a separate process: Slicer stays responsive and Segment turns into Cancel.
The bundled brain-tissue model is a demonstration model, not for clinical use.
See <a href="https://github.com/UNet3DSegment/SlicerUNet3DSegment#readme">the documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Built on the 3D U-Net of Cicek et al. (2016), TensorFlow/Keras, SimpleITK and 3D Slicer.
""")


#
# UNet3DSegmentParameterNode
#


@parameterNodeWrapper
class UNet3DSegmentParameterNode:
    """The panel's choices, saved with the scene. inputVolume0..3 are the model card's channels in order."""

    inputVolume0: vtkMRMLScalarVolumeNode
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelPath: pathlib.Path
    # One field per option on the panel; enums, ranges and defaults come from UNet3DSegmentLib.base.options.
    device: choiceEnum("device") = default("device")
    overlap: Annotated[float, WithinRange(*panel_range("overlap"))] = default("overlap")
    batchSize: Annotated[int, WithinRange(*panel_range("batch_size"))] = default("batch_size")
    blend: choiceEnum("blend") = default("blend")
    tta: bool = default("tta")
    largestComponent: bool = default("largest_component")
    precision: choiceEnum("precision") = default("precision")
    backend: choiceEnum("backend") = default("backend")
    gpuMemoryLimit: str = default("gpu_memory_limit")  # a size such as 6G; empty: no limit
    trustModel: bool = default("trust_model")  # a SavedModel may then run any operation: asked before it is set
    pythonExecutable: str = ""


#
# UNet3DSegmentWidget
#


class UNet3DSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: pick volumes and a model, Segment (turns into Cancel), follow progress; runs never block Slicer."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._card = None
        self._tracker = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UNet3DSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = UNet3DSegmentLogic()
        self._inputLabels = [self.ui.inputVolumeLabel0, self.ui.inputVolumeLabel1, self.ui.inputVolumeLabel2,
                             self.ui.inputVolumeLabel3]
        self._inputSelectors = [self.ui.inputVolumeSelector0, self.ui.inputVolumeSelector1,
                                self.ui.inputVolumeSelector2, self.ui.inputVolumeSelector3]
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.bundledModelButton.connect("clicked(bool)", self.onBundledModelButton)
        self.ui.pythonBrowseButton.connect("clicked(bool)", self.onPythonBrowseButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        self.ui.trustModelCheckBox.connect("toggled(bool)", self.onTrustModelToggled)
        self.ui.segmentsTableWidget.setColumnCount(len(SEGMENT_TABLE_HEADERS))
        self.ui.segmentsTableWidget.setHorizontalHeaderLabels(SEGMENT_TABLE_HEADERS)
        self.ui.logTextEdit.maximumBlockCount = LOG_LINES_KEPT
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancelJob()
        self._timer.stop()
        self.logic.shutdownEngine()  # the warm engine child goes with the module
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self._stopObservingParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelJob()  # its input volumes are about to go
        self.logic.shutdownEngine()  # a new scene may bring another model: free the memory now
        self.setParameterNode(None)
        self._showSegments(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self._parameterNode.trustModel = False  # never taken from a loaded scene: asked for in this session
        if str(self._parameterNode.modelPath) in ("", "."):
            bundled = self.logic.bundledModelPath()
            if bundled is not None:
                self._parameterNode.modelPath = bundled
        if not self._parameterNode.inputVolume0:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume0 = firstVolumeNode
        self.onModelChanged()

    def setParameterNode(self, inputParameterNode: Optional[UNet3DSegmentParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._stopObservingParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _stopObservingParameterNode(self) -> None:
        if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onModelChanged(self, path=None) -> None:
        """Show the model card, and one input selector per channel labelled with the channel's name."""
        try:
            self._card, fromFile = self.logic.modelCard(self.ui.modelPathLineEdit.currentPath)
            self.ui.modelCardLabel.text = panel_text.card_summary_html(self._card, fromFile)
            self.ui.classesLabel.text = panel_text.classes_html(self._card)
        except UNet3DSegmentError as error:
            self._card = None
            self.ui.modelCardLabel.text = panel_text.error_html(error)
            self.ui.classesLabel.text = ""
        channels = self._card.in_channels if self._card else 1
        for index, (label, selector) in enumerate(zip(self._inputLabels, self._inputSelectors)):
            label.visible = selector.visible = index < channels
            if self._card and index < channels:
                label.text = panel_text.channel_label(self._card, index)
        if channels > MAX_CHANNELS:
            self.ui.statusLabel.text = _("This model takes {count} input volumes; the panel offers {max}. Use "
                                         "UNet3DSegmentLogic().segment([...]) in the Python console.").format(
                count=channels, max=MAX_CHANNELS)
        self._checkCanApply()

    def _inputVolumes(self) -> list:
        channels = self._card.in_channels if self._card else 1
        return [getattr(self._parameterNode, f"inputVolume{i}") for i in range(min(channels, MAX_CHANNELS))]

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._job is not None:
            self.ui.segmentButton.enabled = not self._job.cancelRequested
            return
        ready = bool(self._parameterNode and self._card and self._card.in_channels <= MAX_CHANNELS)
        ready = ready and all(self._inputVolumes())
        self.ui.segmentButton.enabled = ready
        self.ui.segmentButton.toolTip = _("Segment the input volume(s)") if ready else _(
            "Choose a model with a readable card and one input volume per channel")

    def onBundledModelButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The bundled model is missing.")):
            self._parameterNode.modelPath = self.logic.modelPath(None)

    def onPythonBrowseButton(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Python executable that runs the engine"))
        if path:
            self._parameterNode.pythonExecutable = path

    def onTrustModelToggled(self, checked: bool) -> None:
        """Trusting a model is asked for each time it is switched on: a SavedModel is a program."""
        if checked and not _confirm(_(
                "Trust this model? A trusted SavedModel may run any TensorFlow operation, reading and writing "
                "files with your rights. Only for models from a source you trust.")):
            self._parameterNode.trustModel = False
            self.ui.trustModelCheckBox.checked = False  # also the widget, whichever of the two Qt updates last

    def onOutputChanged(self, node=None) -> None:
        """The Show 3D button follows the chosen output segmentation."""
        self.ui.show3DButton.setSegmentationNode(node)

    def onSegmentButton(self) -> None:
        if self._job is not None:
            self._job.requestCancel()  # the timer keeps polling until the child is gone
            self.ui.segmentButton.text = _("Cancelling...")
            self._log(_("Cancel requested."))
            self._checkCanApply()
            return
        # Questions first, with the normal cursor; the wait cursor only while the run starts.
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation.")):
            self.ui.logTextEdit.clear()
            p = self._parameterNode
            python = p.pythonExecutable.strip() or None
            if not self._ensureDependencies(python):
                return
            output = p.outputSegmentation
            if not self._confirmReplace(output):
                return
            options = options_from_parameters(p)
            self._log(_("Segmenting with {model}").format(model=p.modelPath))
            self._tracker = panel_text.ProgressTracker()
            with _waitCursor():
                self._job = self.logic.segment(
                    self._inputVolumes(), output, model=p.modelPath, options=options, pythonExecutable=python,
                    replaceExisting=output is not None, waitForCompletion=False, progress=self.onProgress)
            self._setRunning(True)
            self._timer.start()

    def _confirmReplace(self, output) -> bool:
        """Ask before replacing the segments of a segmentation this panel did not make."""
        if output is None or output.GetSegmentation().GetNumberOfSegments() == 0:
            return True
        if output.GetAttribute(RESULT_ATTRIBUTE) == resultFingerprint(output, self._inputVolumes()[0]):
            return True  # the panel's own result, unedited, on the same input: a re-run updates it
        question = _("Replace the {count} segments of '{name}' with the result?").format(
            count=output.GetSegmentation().GetNumberOfSegments(), name=output.GetName())
        return _confirm(question)

    def _ensureDependencies(self, python: Optional[str]) -> bool:
        """Offer to install what Slicer's Python lacks (never at import, never under --testing)."""
        plan = install.plan_dependencies(
            python, self._parameterNode.backend.value, self.resourcePath("requirements.txt"),
            testing=slicer.app.testingEnabled(), env=None if python is None else slicer.util.startupEnvironment())
        if plan.action == "refuse":
            raise BadInputError(plan.message)
        if plan.action == "ask":
            torch, others = install.split_torch(plan.requirements)
            installTorch = install.pytorch_extension_installer() if torch else None
            if not _confirm(plan.message):
                self._log(_("Installation declined: nothing was run."))
                return False
            self._log(_("Installing {requirements} into Slicer's Python...").format(
                requirements=", ".join(plan.requirements)))
            if installTorch is not None:
                installTorch()
            if others:
                with _waitCursor(enabled=_pipEnsure() is None):  # pip_ensure shows its own progress dialog
                    self.logic.installDependencies(others)
            self._log(_("Installed."))
        return True

    def onProgress(self, event: dict) -> None:
        previous = self._tracker.view
        view = self._tracker.update(event)
        self.ui.progressBar.value = view.percent
        self.ui.progressBar.format = f"{view.bar_text}  %p%"
        self.ui.statusLabel.text = view.status
        line = panel_text.log_line(previous, view, event)
        if line:
            self._log(line)

    def onPoll(self) -> None:
        if self._job is None:
            self._timer.stop()
        elif self._job.poll():
            self._onJobFinished()

    def _onJobFinished(self) -> None:
        self._timer.stop()
        job, self._job = self._job, None
        self._setRunning(False)
        engineOutput = list(getattr(job.process, "stderr_tail", []))
        if engineOutput:
            self._log(_("Engine output:"))
            for line in engineOutput:
                self._log("  " + line)
        if isinstance(job.error, CancelledError):
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled: the scene was left as it was.")
        elif job.error is not None:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=job.error)
            if not slicer.app.testingEnabled():
                slicer.util.errorDisplay(_("Segmentation failed.") + "\n\n" + str(job.error))
        else:
            node = job.segmentationNode
            node.SetAttribute(RESULT_ATTRIBUTE, resultFingerprint(node, job.inputVolume))
            self._parameterNode.outputSegmentation = node  # the selector shows it; a re-run updates it
            self.ui.progressBar.value = 100
            done = job.process.done_event or {}
            self.ui.statusLabel.text = _("Done: {count} segments in '{name}'.").format(
                count=node.GetSegmentation().GetNumberOfSegments(), name=node.GetName()) + "".join(
                " " + _("Warning: {text}").format(text=text) for text in done.get("warnings", []))
            self.ui.modelPathLineEdit.addCurrentPathToHistory()
            self._showSegments(node, done.get("statistics", []), job.card)
        self._log(self.ui.statusLabel.text)

    def _showSegments(self, node, statistics=(), card=None) -> None:
        """The result table (name, colour, mL: the engine's statistics) and Show 3D for ``node`` (None: empty)."""
        table = self.ui.segmentsTableWidget
        rows = panel_text.segment_rows(statistics, card) if node is not None else []
        table.setRowCount(len(rows))
        for index, (name, colour, millilitres) in enumerate(rows):
            colourItem = qt.QTableWidgetItem(colour)
            colourItem.setBackground(qt.QColor(colour))
            for column, item in enumerate((qt.QTableWidgetItem(name), colourItem, qt.QTableWidgetItem(millilitres))):
                table.setItem(index, column, item)
        table.visible = bool(rows)
        self.ui.show3DButton.setSegmentationNode(node)

    def _log(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def _setRunning(self, running: bool) -> None:
        self.ui.segmentButton.text = _("Cancel") if running else _("Segment")
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.advancedCollapsibleButton.enabled = not running
        self._checkCanApply()

    def _cancelJob(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self._onJobFinished()


#
# UNet3DSegmentLogic
#


class UNet3DSegmentLogic(ScriptedLoadableModuleLogic, SegmentationLogicBase):
    """``UNet3DSegmentLib.mrml.logic.UNet3DSegmentLogic`` inside Slicer: its scene, PythonSlicer, parameter node.

    From the Python console: ``UNet3DSegmentLogic().segment(volumeNode)`` returns a segmentation node
    (``waitForCompletion=False`` returns a job to poll; see the base class for every option).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.temporaryRoot = pathlib.Path(slicer.app.temporaryPath) / "UNet3DSegment"
        self.keepEngineWarm = True  # the second Segment on a model skips TensorFlow's start-up and the load

    def getParameterNode(self):
        return UNet3DSegmentParameterNode(super().getParameterNode())

    def defaultPythonExecutable(self) -> pathlib.Path:
        return slicer_python(slicer.app.slicerHome)

    def baseEnvironment(self):
        return slicer.util.startupEnvironment()

    def processEvents(self) -> None:
        slicer.app.processEvents()

    def bundledModelPath(self) -> Optional[pathlib.Path]:
        try:
            return self.modelPath(None)
        except UNet3DSegmentError:
            return None

    def installDependencies(self, requirements: list, skipInTesting: bool = True) -> None:
        """pip-install ``requirements`` into Slicer's Python, pinning Slicer's own numpy/SimpleITK/VTK."""
        install.install_requirements(requirements, slicer.util.pip_install, _pipEnsure(), skipInTesting)


def _confirm(question: str) -> bool:
    """OK/Cancel dialog; under ``--testing`` no dialog and OK (Slicer's own answer there is not OK)."""
    return slicer.app.testingEnabled() or slicer.util.confirmOkCancelDisplay(question)


@contextlib.contextmanager
def _waitCursor(enabled: bool = True):
    """The wait cursor over a block that shows no dialog (``enabled=False``: the cursor is left alone)."""
    if enabled:
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
    try:
        yield
    finally:
        if enabled:
            slicer.app.restoreOverrideCursor()


def _pipEnsure():
    """``slicer.packaging.pip_ensure`` on Slicer 5.12 and later; None on 5.8 and 5.10, which lack it."""
    try:
        from slicer.packaging import pip_ensure
    except ImportError:
        return None
    return pip_ensure


#
# UNet3DSegmentTest
#


class UNet3DSegmentTest(ScriptedLoadableModuleTest):
    """Runs the bundled model for real on a synthetic brain, and cancels a run.

    The engine needs TensorFlow: in Slicer's own Python it is installed first if missing, or set
    UNET3DSEGMENT_TEST_PYTHON to a Python environment that has it.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentPhantomWithBundledModel()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()

    def _prepare(self):
        logic = UNet3DSegmentLogic()
        python = os.environ.get("UNET3DSEGMENT_TEST_PYTHON") or None
        missing = dependencies.missing_modules(python)
        if missing and python is None:
            logic.installDependencies(dependencies.requirements_for(missing), skipInTesting=False)
        t1, labels = phantom.brain_phantom()
        volume = slicer.util.addVolumeFromArray(t1, name="PhantomT1")
        volume.SetOrigin(*[-(n - 1) / 2.0 for n in reversed(t1.shape)])  # centred, as a real header would be
        return logic, python, volume, labels

    def test_SegmentPhantomWithBundledModel(self):
        self.delayDisplay("Segmenting a synthetic brain with the bundled model")
        logic, python, volume, reference = self._prepare()
        card, cardFromFile = logic.modelCard(None)
        self.assertTrue(cardFromFile)
        events = []
        node = logic.segment(volume, pythonExecutable=python, progress=events.append)

        segmentation = node.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, [c.name for c in card.classes[1:]])
        result = sum((index + 1) * (slicer.util.arrayFromSegmentBinaryLabelmap(
            node, segmentation.GetNthSegmentID(index), volume) > 0) for index in range(len(names)))
        brainDice, classDice = phantom.score(result, reference)
        self.assertEqual(phantom.score_failures(brainDice, classDice, names), [])
        self.assertEqual(events[-1]["stage"], "done")
        self.delayDisplay(f"Test passed: Dice {', '.join(f'{v:.3f}' for v in classDice)}, brain {brainDice:.3f}")

    def test_CancelLeavesSceneUnchanged(self):
        self.delayDisplay("Cancelling a running segmentation")
        logic, python, volume = self._prepare()[:3]
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        events = []
        job = logic.segment(volume, pythonExecutable=python, tta=True, overlap=0.75, waitForCompletion=False,
                            progress=events.append)
        deadline = time.monotonic() + 300
        while not any(e["stage"] == "inference" for e in events):
            self.assertFalse(job.poll(), f"finished before it could be cancelled: {job.error}")
            self.assertLess(time.monotonic(), deadline)
            slicer.app.processEvents()
            time.sleep(0.05)
        job.requestCancel()  # as the Cancel button does: the child's tree ends while Slicer keeps running
        while not job.poll():
            self.assertLess(time.monotonic(), deadline)
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertIsInstance(job.error, CancelledError)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        leftovers = [p.name for p in logic.temporaryRoot.glob("UNet3DSegment-*")]
        self.assertEqual(leftovers, [])
        self.delayDisplay("Test passed")
