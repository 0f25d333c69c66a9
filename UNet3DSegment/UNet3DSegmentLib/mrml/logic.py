"""Segment MRML volume nodes with the engine in a child process; import the result as segments.

The Slicer-facing logic, kept free of Qt and of ``slicer.app`` so that it runs on ``slicer-core``
(headless, in tests and scripts) exactly as inside Slicer. ``UNet3DSegmentLogic.segment`` writes the
input volumes to a temporary folder as NRRD through Slicer's own storage node (geometry kept, oblique
directions included), starts the engine's command line with JSON-lines progress
(``engine_process``), and on success imports the labelmap into a segmentation node with the model
card's names, colours and terminology. Cancel and failure leave the scene as it was; the temporary
folder goes in every case.

Axis order: nothing here touches voxel arrays; geometry travels in the NRRD headers, written and read
by Slicer's storage nodes (RAS inside Slicer, LPS in the files).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import slicer
import vtk

from ..client.engine_process import (
    EngineProcess,
    default_python_executable,
    engine_environment,
    segment_command,
)
from ..client.warm_engine import DEFAULT_IDLE_TIMEOUT, WarmEngine
from ..base.errors import BadInputError, BadModelError, CancelledError, UNet3DSegmentError
from ..base.options import SegmentOptions
from ..engine.card import ModelCard, card_for_model, default_card
from ..engine.model_summary import default_card_for_model

ProgressCallback = Callable[[dict], None]
PathLike = Union[str, Path]
POLL_SECONDS = 0.05
TEMP_PREFIX = "UNet3DSegment-"
OUTPUT_NAME = "segmentation.nrrd"

_log = logging.getLogger(__name__)


class SegmentationJob:
    """One running segmentation: poll it (GUI timer) or wait for it; cancel at any time.

    ``poll()`` forwards progress events to the callback and returns True once the job is over; then
    ``segmentationNode`` holds the result or ``error`` the failure (``result()`` returns or raises).
    """

    def __init__(
        self,
        logic: UNet3DSegmentLogic,
        process: EngineProcess,
        temporaryDirectory: Path,
        request: dict[str, Any],
        progress: Optional[ProgressCallback],
    ) -> None:
        self.process = process
        self.segmentationNode = None
        self.error: Optional[UNet3DSegmentError] = None
        self._logic = logic
        self._request = request
        self._progress = progress
        self._temporaryDirectory = temporaryDirectory
        self._finished = False
        self._cancelRequested = False
        # Safety net if the job is dropped unfinished: kill the child, remove the temporary folder.
        self._finalizer = weakref.finalize(self, _abandon, process, str(temporaryDirectory))

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def cancelRequested(self) -> bool:
        return self._cancelRequested

    @property
    def inputVolume(self):
        """The (first) input volume node: the result's reference geometry."""
        return self._request["inputVolume"]

    @property
    def card(self):
        """The model card the result's segments were named from."""
        return self._request["card"]

    def poll(self) -> bool:
        """Forward new progress events; when the child has ended, import or record the error. Never blocks."""
        if self._finished:
            return True
        self._forward(self.process.poll())
        if self._finished or not self.process.finished:  # (the callback may have cancelled)
            return self._finished
        self._forward(self.process.poll())
        if self._finished:
            return True
        if self._cancelRequested:  # even if the child had just succeeded: nothing goes into the scene
            self.error = CancelledError("segmentation cancelled; the scene was left as it was")
            self._finish()
            return True
        try:
            error = self.process.error()
            if error is not None:
                raise error
            self.segmentationNode = self._logic._importResult(self.process.output, **self._request)
        except UNet3DSegmentError as error:
            self.error = error
        except Exception as error:  # noqa: BLE001 - MRML/VTK failures become one clear error
            wrapped = UNet3DSegmentError(f"importing the segmentation failed: {type(error).__name__}: {error}")
            wrapped.__cause__ = error
            self.error = wrapped
        finally:
            self._finish()
        return True

    def wait(self, timeout: Optional[float] = None, idle: Optional[Callable[[], None]] = None):
        """Block until the job is over and return the segmentation node (or raise its error).

        ``idle`` is called between polls (Slicer passes ``slicer.app.processEvents``). An interrupt
        (Ctrl+C in a console) cancels the child before it propagates.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self.poll():
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"segmentation still running after {timeout} s")
                if idle is not None:
                    idle()
                time.sleep(POLL_SECONDS)
        except BaseException:
            if not self._finished:
                self.cancel()
            raise
        return self.result()

    def result(self):
        """The segmentation node of a finished job; raises the job's error if it failed."""
        if not self._finished:
            raise BadInputError("the segmentation is still running; poll() until it returns True")
        if self.error is not None:
            raise self.error
        return self.segmentationNode

    def requestCancel(self) -> None:
        """Ask the child's process tree to end and return at once; keep polling until ``poll()`` is True."""
        if not self._finished:
            self._cancelRequested = True
            self.process.request_cancel()

    def cancel(self) -> None:
        """End the child's process tree and wait for it; the scene stays as it was, the temporary folder goes."""
        if self._finished:
            return
        self._cancelRequested = True
        self.process.cancel()
        self.poll()

    def _forward(self, events: Sequence[dict]) -> None:
        if self._progress is None:
            return
        for event in events:
            try:
                self._progress(event)
            except Exception:  # noqa: BLE001 - a faulty callback must not break the run
                _log.exception("progress callback failed on %s", event)

    def _finish(self) -> None:
        self._finished = True
        self._finalizer.detach()
        shutil.rmtree(self._temporaryDirectory, ignore_errors=True)


def _abandon(process: EngineProcess, temporaryDirectory: str) -> None:
    if not process.finished:  # behind PythonSlicer the launcher may be gone while python-real still runs
        process.cancel(grace_seconds=1.0)
    shutil.rmtree(temporaryDirectory, ignore_errors=True)


class UNet3DSegmentLogic:
    """Segment volume nodes with a Keras 3D U-Net model; usable without any GUI.

    ``scene`` defaults to ``slicer.mrmlScene``; ``temporaryRoot`` to the system temporary folder.
    The Slicer module subclasses this to add its parameter node and Slicer's own Python launcher.

    ``keepEngineWarm``: run through a ``WarmEngine`` (``client/warm_engine.py``) that keeps the engine
    child and its model loaded between runs (replaced when the model, its file, the runtime options,
    the interpreter or the environment change; it exits by itself after ``engineIdleTimeout``
    seconds without a run; a run started while another runs on it gets a child of its own). Whoever
    sets it calls ``shutdownEngine()`` when done (the Slicer module: on module cleanup and scene
    close). Default False: one child per run.
    """

    def __init__(self, scene=None, temporaryRoot: Optional[PathLike] = None, keepEngineWarm: bool = False) -> None:
        super().__init__()
        self._scene = scene
        self.temporaryRoot = None if temporaryRoot is None else Path(temporaryRoot)
        self.keepEngineWarm = keepEngineWarm
        self.engineIdleTimeout = DEFAULT_IDLE_TIMEOUT
        self._warmEngine: Optional[WarmEngine] = None

    # --- hooks the Slicer module overrides ------------------------------------------------------
    @property
    def scene(self):
        scene = self._scene if self._scene is not None else getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise BadInputError("no MRML scene: pass scene= to UNet3DSegmentLogic when running outside Slicer")
        return scene

    def defaultPythonExecutable(self) -> Path:
        """The interpreter that runs the engine when none is chosen (Slicer: PythonSlicer)."""
        return default_python_executable()

    def baseEnvironment(self) -> Mapping[str, str]:
        """Environment the child starts from (Slicer: its startup environment)."""
        return os.environ

    # --- model ----------------------------------------------------------------------------------
    @staticmethod
    def modelPath(model: Optional[PathLike] = None) -> Path:
        """``model`` as an existing path; ``None`` or empty gives the bundled demo model.

        A SavedModel's ``saved_model.pb`` (what a file dialog can pick) stands for its folder.
        """
        if model is None or str(model) in ("", "."):
            from ..engine.bundled_models import default_model_path

            return default_model_path()
        path = Path(model).expanduser()
        if path.name == "saved_model.pb":
            path = path.parent
        if not path.exists():
            raise BadModelError(f"model {path} not found; choose a .keras or .h5 file or a SavedModel folder")
        return path

    @classmethod
    def modelCard(cls, model: Optional[PathLike] = None) -> tuple[ModelCard, bool]:
        """The card of ``model`` and whether it came from a file (False: seed defaults assumed).

        Without a card the defaults take the model's own channel and class counts where its file says
        them cheaply (``engine.model_summary``: nothing is loaded or built).
        """
        path = cls.modelPath(model)
        card = card_for_model(path)
        return (card, True) if card is not None else (default_card_for_model(path), False)

    # --- segmentation ---------------------------------------------------------------------------
    def segment(
        self,
        inputVolumes,
        outputSegmentation=None,
        model: Optional[PathLike] = None,
        options: Optional[SegmentOptions] = None,
        pythonExecutable: Optional[PathLike] = None,
        replaceExisting: bool = False,
        showResult: bool = True,
        extraArguments: Sequence[str] = (),
        waitForCompletion: bool = True,
        progress: Optional[ProgressCallback] = None,
        **optionValues: Any,
    ):
        """Segment ``inputVolumes`` (one volume node per model channel, or a single node).

        ``options`` (a ``SegmentOptions``: overlap, batch size, device, precision, backend, ...) says how
        the engine runs; any of its options may also be given as keywords, in camelCase or snake_case
        (``overlap=0.25``, ``batchSize=4``, ``gpuMemoryLimit="6G"``), applied on top of ``options``.
        A bad value raises ``BadInputError`` naming the option before anything starts.

        Returns the segmentation node when ``waitForCompletion`` (raising the engine's error kind on
        failure), else a running ``SegmentationJob`` to poll. ``outputSegmentation=None`` creates a
        new node; an existing node is only replaced with ``replaceExisting=True``. ``progress`` gets
        every engine event (a dict, see docs/ARCHITECTURE.md).
        """
        options = SegmentOptions.from_values(optionValues, base=options)
        volumes = self._checkInputs(inputVolumes)
        modelPath = self.modelPath(model)
        card, cardFromFile = self.modelCard(modelPath)
        if len(volumes) != card.in_channels:
            names = ", ".join(card.input.channels)
            raise BadInputError(
                f"model {card.name} takes {card.in_channels} input volume(s) ({names}), got {len(volumes)}; "
                "pass one volume per channel, in that order"
            )
        self._checkOutput(outputSegmentation, replaceExisting)
        chosen = "" if pythonExecutable is None else str(pythonExecutable).strip()
        python = Path(chosen) if chosen not in ("", ".") else self.defaultPythonExecutable()

        root = self.temporaryRoot
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        temporaryDirectory = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=None if root is None else str(root)))
        try:
            inputs = [self._writeVolume(v, temporaryDirectory / f"input_{i}.nrrd") for i, v in enumerate(volumes)]
            process = self._startEngine(python, inputs, temporaryDirectory / OUTPUT_NAME, modelPath, options,
                                        extraArguments, temporaryDirectory)
        except BaseException:
            shutil.rmtree(temporaryDirectory, ignore_errors=True)
            raise
        request = {
            "inputVolume": volumes[0],
            "outputSegmentation": outputSegmentation,
            "card": card,
            "cardFromFile": cardFromFile,
            "showResult": showResult,
        }
        job = SegmentationJob(self, process, temporaryDirectory, request, progress)
        if waitForCompletion:
            return job.wait(idle=self.processEvents)
        return job

    def processEvents(self) -> None:
        """Called while a blocking segment() waits (Slicer keeps its GUI alive here)."""

    def _startEngine(self, python: Path, inputs: Sequence[Path], output: Path, modelPath: Path,
                     options: SegmentOptions, extraArguments: Sequence[str], temporaryDirectory: Path):
        """A request on the warm engine (``keepEngineWarm``, unless it is busy), else a child of its own."""
        env = engine_environment(self.baseEnvironment())
        if self.keepEngineWarm:
            if self._warmEngine is None or self._warmEngine.idle_timeout != float(self.engineIdleTimeout):
                self.shutdownEngine(wait=False)
                self._warmEngine = WarmEngine(idle_timeout=self.engineIdleTimeout)
            if not self._warmEngine.busy:
                return self._warmEngine.run(python, inputs, output, modelPath, options, extraArguments, env=env)
        elif self._warmEngine is not None:  # switched off: its memory goes now, not at the idle timeout
            self.shutdownEngine(wait=False)
        command = segment_command(python, inputs, output, modelPath, options, extraArguments)
        return EngineProcess.start(command, env=env, cwd=temporaryDirectory)

    def shutdownEngine(self, wait: bool = False) -> None:
        """Stop the warm engine child, if any (a run on it ends as cancelled). Safe to call at any time.

        Returns at once unless ``wait``: the child gets SIGTERM now and a background thread makes sure
        it is gone (SIGKILL after the grace period).
        """
        engine, self._warmEngine = self._warmEngine, None
        if engine is not None:
            engine.stop(wait=wait)

    # --- steps ----------------------------------------------------------------------------------
    def _checkInputs(self, inputVolumes) -> list:
        volumes = list(inputVolumes) if isinstance(inputVolumes, (list, tuple)) else [inputVolumes]
        if not volumes:
            raise BadInputError("no input volume given; pass one volume node per model channel")
        for volume in volumes:
            if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode"):
                raise BadInputError(f"input {volume!r} is not a scalar volume node; select a volume")
            if volume.GetScene() is not self.scene:
                raise BadInputError(f"input volume {volume.GetName()} is not in this scene; add it to the scene first")
            if volume.GetImageData() is None:
                raise BadInputError(f"input volume {volume.GetName()} has no image data; load a volume first")
        return volumes

    def _checkOutput(self, outputSegmentation, replaceExisting: bool) -> None:
        if outputSegmentation is None:
            return
        if not outputSegmentation.IsA("vtkMRMLSegmentationNode"):
            raise BadInputError(f"output {outputSegmentation.GetName()} is not a segmentation node")
        if outputSegmentation.GetScene() is not self.scene:
            raise BadInputError(f"output segmentation {outputSegmentation.GetName()} is not in this scene")
        if not replaceExisting:
            count = outputSegmentation.GetSegmentation().GetNumberOfSegments()
            raise BadInputError(
                f"segmentation {outputSegmentation.GetName()} already exists ({count} segments); pass "
                "replaceExisting=True to replace its segments, or outputSegmentation=None for a new one"
            )

    @staticmethod
    def _writeVolume(volume, path: Path) -> Path:
        """Write through Slicer's storage node (not added to the scene): the file has Slicer's geometry."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(False)
        if not storage.WriteData(volume) or not path.is_file():
            raise BadInputError(
                f"cannot write volume {volume.GetName()} to {path}; check free space in the temporary folder"
            )
        return path

    def _importResult(self, output: Optional[Path], inputVolume, outputSegmentation, card: ModelCard,
                      cardFromFile: bool, showResult: bool):
        """Read the engine's labelmap and turn it into segments; the scene changes only on success."""
        if output is None or not Path(output).is_file():
            raise UNet3DSegmentError(f"the engine reported {output} but the file is missing; run it again")
        labels = _readLabelmap(Path(output))
        highest = int(labels.GetImageData().GetScalarRange()[1])
        if highest >= card.num_classes and not cardFromFile:
            card = default_card(num_classes=highest + 1)  # no card: "Class 1".."Class n" for what came out
        if highest >= card.num_classes:
            raise BadModelError(
                f"the result has label {highest} but model card {card.name} lists {card.num_classes} classes; "
                "fix the card's classes"
            )
        if outputSegmentation is None:
            return self._newSegmentation(labels, inputVolume, card, showResult)
        self._replaceSegments(outputSegmentation, labels, inputVolume, card, showResult)
        return outputSegmentation

    def _newSegmentation(self, labels, inputVolume, card: ModelCard, showResult: bool):
        scene = self.scene
        name = scene.GenerateUniqueName(f"{inputVolume.GetName()} {card.name}")
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        try:
            node.CreateDefaultDisplayNodes()
            node.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
            _fillSegments(node, labels, card)
            node.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
            self._placeInSubjectHierarchy(node, inputVolume)
            if showResult:
                self._show(node, inputVolume)
        except BaseException:
            _removeNode(scene, node)
            raise
        return node

    def _replaceSegments(self, node, labels, inputVolume, card: ModelCard, showResult: bool) -> None:
        backup = slicer.vtkSegmentation()
        backup.DeepCopy(node.GetSegmentation())
        try:
            node.GetSegmentation().RemoveAllSegments()
            _fillSegments(node, labels, card)
        except BaseException:
            node.GetSegmentation().DeepCopy(backup)
            raise
        if not node.GetDisplayNode():
            node.CreateDefaultDisplayNodes()
        node.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        node.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        if showResult:
            self._show(node, inputVolume)

    def _placeInSubjectHierarchy(self, node, inputVolume) -> None:
        """Put the segmentation beside the input (under its study), when the scene has a hierarchy."""
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if hierarchy is None:
            return
        inputItem = hierarchy.GetItemByDataNode(inputVolume)
        if not inputItem:
            return
        parent = hierarchy.GetItemParent(inputItem)
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:
            hierarchy.CreateItem(parent, node)

    def _show(self, node, inputVolume) -> None:
        """Segments visible, input as background of every slice view, so the result shows over it."""
        displayNode = node.GetDisplayNode()
        if displayNode is not None:
            displayNode.SetVisibility(True)
        composites = self.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        for index in range(composites.GetNumberOfItems()):
            composites.GetItemAsObject(index).SetBackgroundVolumeID(inputVolume.GetID())


def resultFingerprint(node, inputVolume) -> str:
    """The input volume and the state of the segments' labelmaps: changes when a result is edited or re-aimed.

    The panel stores it on its own result and replaces that result unasked only while it still matches.
    """
    segmentation = node.GetSegmentation()
    stamps = [segmentation.GetNthSegment(i).GetRepresentation("Binary labelmap")
              for i in range(segmentation.GetNumberOfSegments())]
    stamp = max((labelmap.GetMTime() for labelmap in stamps if labelmap is not None), default=0)
    return f"{inputVolume.GetID() if inputVolume is not None else ''}:{segmentation.GetNumberOfSegments()}:{stamp}"


def _readLabelmap(path: Path):
    """The engine's labelmap as a labelmap volume node outside any scene (Slicer's reader, RAS)."""
    node = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise UNet3DSegmentError(
            f"cannot read the engine's result {path.name}; run the engine in a terminal to check it"
        )
    return node


def _fillSegments(node, labels, card: ModelCard) -> None:
    """One segment per non-background class (empty if absent), sharing the labelmap as label values."""
    segmentation = node.GetSegmentation()
    segmentIds = vtk.vtkStringArray()
    for info in card.classes[1:]:
        segmentId = segmentation.AddEmptySegment(segmentation.GenerateUniqueSegmentID(info.name), info.name,
                                                 list(info.rgb01))
        segment = segmentation.GetSegment(segmentId)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        if info.terminology is not None:
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), info.terminology.to_slicer_string())
        segmentIds.InsertNextValue(segmentId)

    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(labels.GetImageData())
    ijkToRas = vtk.vtkMatrix4x4()
    labels.GetIJKToRASMatrix(ijkToRas)
    image.SetGeometryFromImageToWorldMatrix(ijkToRas)
    # Label value i goes to segmentIds[i - 1]: class i of the card.
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(image, node, segmentIds, None):
        raise UNet3DSegmentError("Slicer could not import the result labelmap into the segmentation")


def _removeNode(scene, node) -> None:
    """Remove a node we added, with the display and storage nodes that came with it."""
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    helpers.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is scene:
            scene.RemoveNode(helper)
