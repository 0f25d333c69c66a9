"""The browser front end: a trame-slicer app around the same MRML logic as the Slicer module.

``UNet3DSegmentWebApp`` holds one Slicer scene (trame-slicer's ``SlicerApp``: real MRML, slice and 3D
views rendered off screen and streamed to the page) and drives it from the page's buttons:
load a volume (upload or the demo MRI), choose a model, segment, cancel, toggle segments, download
the result. Segmentation goes through ``mrml.logic.UNet3DSegmentLogic`` -- the class the Slicer
module uses -- so writing the input, running the engine in a child process and importing names,
colours and terminology happen in exactly one place. This module only adds what a web page needs:
an asyncio task that polls the running job (the page stays responsive), state for the widgets
(``web/ui.py`` builds them), upload checks (``web/files.py``) and the .seg.nrrd download.

One scene per server: every browser tab connected to it sees and drives the same volume.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import slicer
from trame.app import TrameApp
from trame.app.asynchronous import create_task
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories

from ..base.errors import BadInputError, CancelledError, UNet3DSegmentError
from ..base.options import Option, SegmentOptions
from ..mrml.logic import UNet3DSegmentLogic
from .files import DEFAULT_MAX_UPLOAD_MB, DEMO_VOLUME_NAME, demo_volume_file, safe_file_name, write_upload
from ..client.panel_text import ProgressTracker

PathLike = Union[str, Path]
POLL_SECONDS = 0.1
LAYOUT = "Axial Primary"  # large axial view, 3D / coronal / sagittal beside it
PAGE_OPTIONS = ("overlap", "batch_size", "blend", "device", "precision", "tta", "largest_component")  # under Advanced

_log = logging.getLogger(__name__)


def _hex(rgb01) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in list(rgb01)[:3])


class UNet3DSegmentWebApp(TrameApp):
    """The page and its server-side state. ``model``: the preselected model (default: bundled demo).

    ``demo_downsample`` > 1 loads a block-averaged demo MRI (tests, slow machines);
    ``max_upload_mb`` caps uploads; ``temporary_root`` holds uploads and the logic's temporary folders.
    """

    def __init__(
        self,
        server=None,
        model: Optional[PathLike] = None,
        demo_downsample: int = 1,
        max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
        temporary_root: Optional[PathLike] = None,
    ) -> None:
        super().__init__(server=server)
        self.demo_downsample = int(demo_downsample)
        self.max_upload_mb = float(max_upload_mb)
        self._temporary = Path(tempfile.mkdtemp(prefix="UNet3DSegment-web-", dir=temporary_root))
        self.slicer_app = SlicerApp()
        self.logic = UNet3DSegmentLogic(scene=self.slicer_app.scene, temporaryRoot=self._temporary / "jobs")
        self.volume = None
        self.segmentation = None
        self._job = None
        self._follower = None

        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout(LAYOUT)

        self._init_state(model)
        from .ui import build_ui

        self.ui = build_ui(self)
        self.state.change("model_path")(self.on_model_changed)
        self.on_model_changed(self.state.model_path)

    # --- state ----------------------------------------------------------------------------------
    def _init_state(self, model: Optional[PathLike]) -> None:
        items = []  # {"title", "value"}: what the chooser lists; any other typed path works too
        if model is not None:
            path = Path(model).expanduser().resolve()
            items.append({"title": f"{path.name} (--model)", "value": str(path)})
        try:
            bundled = UNet3DSegmentLogic.modelPath(None)
            items.append({"title": f"Bundled demo model ({bundled.name})", "value": str(bundled)})
        except UNet3DSegmentError:
            pass  # no bundled model in this install: the user names one
        items = list({item["value"]: item for item in items}.values())
        state = self.state
        state.update({
            "volume_name": "",
            "info_message": "Load a volume: upload NRRD / NIfTI / MHA, or the demo MRI.",
            "error_message": "",
            "model_items": items,
            "model_path": items[0]["value"] if items else "",
            "card_title": "", "card_description": "", "card_classes": [], "card_error": "",
            **{declared.name: declared.default for declared in self.page_options()},
            "running": False, "run_state": "idle", "progress": 0, "progress_text": "", "status_text": "",
            "segments": [], "download_name": "segmentation.seg.nrrd",
            "max_upload_bytes": int(self.max_upload_mb * 1024 * 1024), "max_upload_mb": self.max_upload_mb,
        })

    def _report(self, info: str = "", error: str = "") -> None:
        self.state.info_message = info
        self.state.error_message = error

    # --- model ----------------------------------------------------------------------------------
    def on_model_changed(self, model_path, **_: Any) -> None:
        """Show the chosen model's card (name, classes with colours) or why it cannot be used."""
        state = self.state
        try:
            card, from_file = UNet3DSegmentLogic.modelCard(model_path or None)
        except UNet3DSegmentError as error:
            state.update({"card_title": "", "card_description": "", "card_classes": [], "card_error": str(error)})
            return
        state.card_title = f"{card.name} {card.version}".strip()
        state.card_description = card.description
        state.card_classes = [{"name": c.name, "color": _hex(c.rgb01)} for c in card.classes[1:]]
        state.card_error = "" if from_file else "No model card beside this model: seed defaults assumed."

    # --- volumes --------------------------------------------------------------------------------
    def load_demo(self) -> None:
        """Load the MNI152 T1 template (nilearn, offline) as the input volume."""
        try:
            path = demo_volume_file(self._temporary, self.demo_downsample)
            self._load_volume_file(path, DEMO_VOLUME_NAME)
        except UNet3DSegmentError as error:
            self._report(error=str(error))

    def upload(self, files: list) -> None:
        """Load the first browser file after checking its type and size; a bad file leaves the scene as it was."""
        if not files:
            return
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self._temporary))
        try:
            path = write_upload(files[0], folder, self.max_upload_mb)
            self._load_volume_file(path, _volume_name(path.name))
        except UNet3DSegmentError as error:
            self._report(error=str(error))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _load_volume_file(self, path: Path, name: str) -> None:
        if self._job is not None:
            raise BadInputError("a segmentation is running; cancel it before loading another volume")
        try:
            nodes = [n for n in self.slicer_app.io_manager.load_volumes([str(path)]) if n is not None]
        except Exception as error:  # noqa: BLE001 - Slicer's reader raises many kinds
            raise BadInputError(f"cannot read {path.name} as a volume ({error}); check the file") from error
        if not nodes or nodes[0].GetImageData() is None:
            for node in nodes:  # a failed read must not leave an empty node behind
                if node.GetScene() is not None:
                    self.slicer_app.scene.RemoveNode(node)
            raise BadInputError(f"cannot read {path.name} as a volume; check that it is a 3D image file")
        self._clear_scene_data()
        self.volume = nodes[0]
        self.volume.SetName(name)
        self.slicer_app.display_manager.show_volume_in_slice_background(self.volume)
        self.slicer_app.display_manager.reset_views()
        dims = self.volume.GetImageData().GetDimensions()
        self.state.volume_name = name
        self.state.segments = []
        self.state.run_state = "idle"
        self._report(info=f"Loaded {name} ({dims[0]} x {dims[1]} x {dims[2]} voxels). Choose a model and Segment.")

    def _clear_scene_data(self) -> None:
        """One volume at a time: the previous volume and its segmentation leave the scene."""
        for node in (self.segmentation, self.volume):
            if node is not None and node.GetScene() is not None:
                self.slicer_app.scene.RemoveNode(node)
        self.segmentation = None
        self.volume = None

    # --- segmentation ---------------------------------------------------------------------------
    def segment(self) -> None:
        """Start the engine on the loaded volume; an asyncio task follows it to the end."""
        if self._job is not None:
            return
        if self.volume is None:
            self._report(error="no volume loaded; upload one or press Load demo MRI first")
            return
        state = self.state
        tracker = ProgressTracker()

        def on_event(event: dict) -> None:
            view = tracker.update(event)
            state.update({"progress": view.percent, "progress_text": view.bar_text, "status_text": view.status})

        try:
            job = self.logic.segment(
                self.volume, outputSegmentation=self.segmentation, replaceExisting=self.segmentation is not None,
                model=state.model_path or None, options=self._options(), waitForCompletion=False, progress=on_event,
            )
        except UNet3DSegmentError as error:
            self._report(error=str(error))
            return
        self._job = job
        state.update({"running": True, "run_state": "running", "progress": 0, "progress_text": "Starting",
                      "status_text": "Starting the engine..."})
        self._report(info="Segmenting in a separate process; the views stay usable.")
        self._follower = create_task(self._follow(job))  # kept: asyncio holds tasks only weakly

    @staticmethod
    def page_options() -> list[Option]:
        """The segment options the page offers (``PAGE_OPTIONS``), as declared in ``base/options.py``."""
        return SegmentOptions.options(PAGE_OPTIONS)

    def _options(self) -> SegmentOptions:
        """The Advanced options from the page, checked against their declarations and the page's limits.

        The browser sends whatever was typed: each value must pass its option's check and lie within
        the range the page's control offers.
        """
        values = {}
        for declared in self.page_options():
            raw = self.state[declared.name]
            value = declared.parse(raw) if isinstance(raw, str) and declared.kind is not str else declared.check(raw)
            if declared.kind in (int, float) and not declared.choices and value is not None:
                low, high = declared.panel_range()
                if not low <= value <= high:
                    raise BadInputError(f"{declared.title} must be {low:g} to {high:g}, got {value}; fix it under Advanced")
            values[declared.name] = value
        return SegmentOptions(**values)

    def cancel(self) -> None:
        """Ask the running job to stop (never blocks); ``_follow`` sees it end."""
        if self._job is not None:
            self._job.requestCancel()
            self.state.status_text = "Cancelling..."

    async def _follow(self, job) -> None:
        """Poll ``job`` from the event loop until it is over, then show its result or its error."""
        try:
            while True:
                with self.state:
                    if job.poll():
                        break
                await asyncio.sleep(POLL_SECONDS)
        except Exception as error:  # noqa: BLE001 - whatever happens, the page must learn the run ended
            _log.exception("following the segmentation failed")
            if not job.finished:
                job.cancel()
            job.error = job.error or UNet3DSegmentError(f"the segmentation failed: {type(error).__name__}: {error}")
        finally:
            self._job = None
        with self.state:
            self.state.running = False
            self._finish(job)

    def _finish(self, job) -> None:
        state = self.state
        if isinstance(job.error, CancelledError):
            state.update({"run_state": "cancelled", "progress": 0, "progress_text": "", "status_text": ""})
            self._report(info="Cancelled; the volume and any previous result are unchanged.")
            return
        if job.error is not None:
            state.update({"run_state": "failed", "progress_text": "Failed", "status_text": ""})
            self._report(error=f"Segmentation failed: {job.error}")
            return
        try:
            self._show_result(job.segmentationNode)
        except Exception as error:  # noqa: BLE001 - display problems must not hide the result's existence
            _log.exception("showing the segmentation failed")
            self._report(error=f"the segmentation was created but cannot be shown: {error}")
            return
        names = ", ".join(s["name"] for s in state.segments)
        state.update({"run_state": "done", "progress": 100, "progress_text": "Done"})
        self._report(info=f"Done: {names}.")

    def _show_result(self, node) -> None:
        """Surfaces for the 3D view, segments in every view, the segment list filled."""
        self.segmentation = node
        node.CreateClosedSurfaceRepresentation()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
        self.slicer_app.display_manager.show_volume_in_slice_background(self.volume)
        for view in self.slicer_app.view_manager.get_threed_views():
            view.reset_camera()
        self.state.download_name = safe_file_name(f"{node.GetName()}.seg.nrrd")
        self._refresh_segments()

    def _refresh_segments(self) -> None:
        node = self.segmentation
        if node is None:
            self.state.segments = []
            return
        segmentation, display = node.GetSegmentation(), node.GetDisplayNode()
        segments = []
        for index in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(index)
            segment = segmentation.GetSegment(segment_id)
            visible = True if display is None else bool(display.GetSegmentVisibility(segment_id))
            segments.append({"id": segment_id, "name": segment.GetName(), "color": _hex(segment.GetColor()),
                             "visible": visible})
        self.state.segments = segments

    def set_segment_visibility(self, segment_id: str, visible: bool) -> None:
        """Show or hide one segment in every view."""
        if self.segmentation is None or self.segmentation.GetDisplayNode() is None:
            return
        self.segmentation.GetDisplayNode().SetSegmentVisibility(str(segment_id), bool(visible))
        self._refresh_segments()

    def download_segmentation(self):
        """The result as .seg.nrrd bytes (Slicer's segmentation writer: names, colours, terminology)."""
        if self.segmentation is None:
            self._report(error="nothing to download yet; segment a volume first")
            return None
        with tempfile.TemporaryDirectory(dir=self._temporary) as folder:
            path = Path(folder) / "result.seg.nrrd"
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(path))
            if not storage.WriteData(self.segmentation) or not path.is_file():
                self._report(error="writing the .seg.nrrd failed; check free space in the temporary folder")
                return None
            return self.server.protocol.addAttachment(path.read_bytes())

    # --- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """End a running job and remove the temporary folder (uploads, demo copy, job folders)."""
        job, self._job = self._job, None
        if job is not None:
            job.cancel()
        shutil.rmtree(self._temporary, ignore_errors=True)


def _volume_name(file_name: str) -> str:
    for suffix in (".nii.gz", ".nrrd", ".nii", ".mha"):
        if file_name.lower().endswith(suffix):
            return file_name[: -len(suffix)] or file_name
    return file_name
