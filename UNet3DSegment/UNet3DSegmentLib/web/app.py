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

Safety (``web/guard.py``, ``web/models.py``): only the server's own origin with the launch's random
token reaches the page or its WebSocket; each WebSocket message is capped at the upload limit; the model
is chosen from a list fixed at launch (bundled, ``--model``, ``--models-dir``), never a typed path; and
the page cannot make the engine trust a SavedModel (``trust_model`` is not a page option).
Slow work stays off the event loop (worker threads): model cards, the demo MRI (prepared in the
background from the start), writing uploads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
from ..engine.card import card_path_for_model
from ..mrml.logic import UNet3DSegmentLogic
from .files import DEFAULT_MAX_UPLOAD_MB, DEMO_VOLUME_NAME, demo_volume_file, safe_file_name, write_upload
from .guard import AccessGuard, message_cap, new_token
from .models import ModelChoices
from ..client.panel_text import ProgressTracker

PathLike = Union[str, Path]
POLL_SECONDS = 0.1
LAYOUT = "Axial Primary"  # large axial view, 3D / coronal / sagittal beside it
PAGE_OPTIONS = ("overlap", "batch_size", "blend", "device", "precision", "tta", "largest_component")  # under Advanced

_log = logging.getLogger(__name__)


class _WebLogic(UNet3DSegmentLogic):
    """The MRML logic with model cards read once, in a worker thread (``cachedCard``), not on the event loop."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._cards: dict = {}

    @staticmethod
    def _cardKey(path) -> tuple:
        stamps = []
        for item in (path, card_path_for_model(path)):
            try:
                info = item.stat()
                stamps.append((info.st_mtime_ns, info.st_size))
            except OSError:
                stamps.append(None)
        return (str(path), *stamps)

    def cachedCard(self, model=None):
        """``modelCard`` of ``model``, kept while neither the model nor its card file changes (call off the loop)."""
        key = self._cardKey(self.modelPath(model))
        if key not in self._cards:
            self._cards[key] = UNet3DSegmentLogic.modelCard(model)
        return self._cards[key]

    def modelCard(self, model=None):  # noqa: D102 - the cached card when segment() asks
        return self.cachedCard(model)


def _hex(rgb01) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in list(rgb01)[:3])


class UNet3DSegmentWebApp(TrameApp):
    """The page and its server-side state. ``model``: the preselected model (default: bundled demo).

    ``demo_downsample`` > 1 loads a block-averaged demo MRI (tests, slow machines);
    ``max_upload_mb`` caps uploads; ``temporary_root`` holds uploads and the logic's temporary folders.
    ``models_dir``: a folder whose models the page may also choose. ``host``: the address the server
    listens on (for the origin check); ``token``: this launch's secret (default: a new random one), in
    ``self.guard.url(port)``.
    """

    def __init__(
        self,
        server=None,
        model: Optional[PathLike] = None,
        demo_downsample: int = 1,
        max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
        temporary_root: Optional[PathLike] = None,
        models_dir: Optional[PathLike] = None,
        host: str = "127.0.0.1",
        token: Optional[str] = None,
    ) -> None:
        super().__init__(server=server)
        self.demo_downsample = int(demo_downsample)
        self.max_upload_mb = float(max_upload_mb)
        self.models = ModelChoices(model, models_dir)
        self.guard = AccessGuard(token or new_token(), host)
        self.server.controller.on_server_bind.add(self._guard_server)
        self._tasks: list = []  # asyncio holds tasks only weakly
        self.server.controller.on_server_ready.add(lambda **_: self._tasks.append(create_task(self._watch_demo())))
        self._temporary = Path(tempfile.mkdtemp(prefix="UNet3DSegment-web-", dir=temporary_root))
        # Slow first-time work (nilearn's import, the demo file) starts now, off the event loop.
        self._workers = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="unet3d-web")
        self.slicer_app = SlicerApp()
        self.logic = _WebLogic(scene=self.slicer_app.scene, temporaryRoot=self._temporary / "jobs")
        self.volume = None
        self.segmentation = None
        self._job = None
        self._busy = ""  # what a pending step (demo, upload, starting a run) is doing, "" when none
        self._follower = None
        self._card_request = 0
        # The last run's engine figures (the done event's "statistics", by segment name) and warnings.
        self._statistics: dict = {}
        self._warnings: list = []

        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout(LAYOUT)

        self._init_state()
        from .ui import build_ui

        self.ui = build_ui(self)
        self.state.change("model_path")(self.on_model_changed)
        self._show_card(self.state.model_path, *self._read_card(self.state.model_path))  # before serving
        self._demo = self._workers.submit(demo_volume_file, self._temporary, self.demo_downsample)

    def _guard_server(self, wslink_server) -> None:
        """trame's ``on_server_bind``: origin, token and message-size checks on wslink's server (web/guard.py)."""
        self.guard.install(wslink_server, self.server.protocol, message_cap(self.max_upload_mb), self._upload_refused)

    def _upload_refused(self, size: int) -> None:
        """The WebSocket layer refused a message over the upload limit at its first chunk."""
        with self.state:
            self._report(error=f"the upload is {size / 1024 / 1024:.0f} MB, over the {self.max_upload_mb:g} MB upload "
                               "limit; crop or compress it, or start the server with a higher --max-upload-mb")

    # --- state ----------------------------------------------------------------------------------
    def _init_state(self) -> None:
        state = self.state
        state.update({
            "volume_name": "",
            "info_message": "Load a volume: upload NRRD / NIfTI / MHA, or the demo MRI.",
            "error_message": "",
            "model_items": self.models.items,  # a choice list fixed at launch: the page never names a path
            "model_path": self.models.default,
            "demo_ready": False, "busy": False,
            "card_title": "", "card_description": "", "card_classes": [], "card_error": "",
            **{declared.name: declared.panel_default() for declared in self.page_options()},
            "running": False, "run_state": "idle", "progress": 0, "progress_text": "", "status_text": "",
            "segments": [], "download_name": "segmentation.seg.nrrd",
            "max_upload_bytes": int(self.max_upload_mb * 1024 * 1024), "max_upload_mb": self.max_upload_mb,
        })

    def _report(self, info: str = "", error: str = "") -> None:
        self.state.info_message = info
        self.state.error_message = error

    # --- model ----------------------------------------------------------------------------------
    async def on_model_changed(self, model_path, **_: Any) -> None:
        """Show the chosen model's card (name, classes with colours) or why it cannot be used.

        Only listed models are read; the card is read and checked in a worker thread.
        """
        self._card_request += 1
        request = self._card_request
        result = await asyncio.to_thread(self._read_card, model_path)
        if request == self._card_request:  # else a newer choice is being read
            with self.state:
                self._show_card(model_path, *result)

    def _read_card(self, model_path) -> tuple:
        """``(card, from_file, error)`` of a listed model (worker thread: files are read and checked here)."""
        try:
            return (*self.logic.cachedCard(self.models.check(model_path)), None)
        except UNet3DSegmentError as error:
            return None, False, error

    def _show_card(self, model_path, card, from_file: bool, error: Optional[Exception]) -> None:
        state = self.state
        if error is not None:
            state.update({"card_title": "", "card_description": "", "card_classes": [], "card_error": str(error)})
            return
        state.card_title = f"{card.name} {card.version}".strip()
        state.card_description = card.description
        state.card_classes = [{"name": c.name, "color": _hex(c.rgb01)} for c in card.classes[1:]]
        state.card_error = "" if from_file else "No model card beside this model: seed defaults assumed."

    # --- volumes --------------------------------------------------------------------------------
    async def _watch_demo(self) -> None:
        """Tell the page (``demo_ready``) once the demo MRI prepared in the background is there."""
        try:
            await asyncio.wrap_future(self._demo)
        except Exception:  # noqa: BLE001 - load_demo reports it, and retries
            return
        with self.state:
            self.state.demo_ready = True

    async def load_demo(self) -> None:
        """Load the MNI152 T1 template (nilearn, offline) as the input volume.

        The file was being prepared since the server started (worker thread); wait for it off the loop.
        """
        if not self._start("Loading the demo MRI..."):
            return
        try:
            if self._demo.done() and self._demo.exception() is not None:  # failed before: try again
                self._demo = self._workers.submit(demo_volume_file, self._temporary, self.demo_downsample)
            path = await asyncio.wrap_future(self._demo)
            self.state.demo_ready = True
            self._load_volume_file(path, DEMO_VOLUME_NAME)
        except UNet3DSegmentError as error:
            self._report(error=str(error))
        finally:
            self._end()

    async def upload(self, files: list) -> None:
        """Load the first browser file after checking its type and size; a bad file leaves the scene as it was."""
        if not files or not isinstance(files[0], dict):
            return
        if not self._start(f"Reading {safe_file_name(str(files[0].get('name', '')))}..."):
            return
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self._temporary))
        try:
            path = await asyncio.to_thread(write_upload, files[0], folder, self.max_upload_mb)
            self._load_volume_file(path, _volume_name(path.name))
        except UNet3DSegmentError as error:
            self._report(error=str(error))
        finally:
            self._end()
            shutil.rmtree(folder, ignore_errors=True)

    def _start(self, doing: str) -> bool:
        """Mark a step as pending (one at a time) and show it now; False (with a message) while another is."""
        if self._busy or self._job is not None:
            self._report(error=f"please wait: {self._busy or 'a segmentation is running'}")
            return False
        self._busy = doing
        self.state.busy = True
        self._report(info=doing)
        self.state.flush()
        return True

    def _end(self) -> None:
        self._busy = ""
        self.state.busy = False

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
    async def segment(self) -> None:
        """Start the engine on the loaded volume; an asyncio task follows it to the end.

        The model must be a listed one; its card is read off the loop; the page's options never include
        ``trust_model``, so a SavedModel always passes the engine's safety check.
        """
        if self._job is not None or self._busy:
            return
        if self.volume is None:
            self._report(error="no volume loaded; upload one or press Load demo MRI first")
            return
        state = self.state
        tracker = ProgressTracker()
        self._statistics, self._warnings = {}, []

        def on_event(event: dict) -> None:
            view = tracker.update(event)
            state.update({"progress": view.percent, "progress_text": view.bar_text, "status_text": view.status})
            if event.get("stage") == "warning":  # e.g. the input checks: kept for the final report
                self._warnings.append(str(event.get("message", "")))
            elif event.get("stage") == "done":  # the engine's own figures (engine/statistics.py)
                self._statistics = {row.get("name"): row for row in event.get("statistics") or []}

        try:
            model = self.models.check(state.model_path)
            options = self._options()
        except UNet3DSegmentError as error:
            self._report(error=str(error))
            return
        if not self._start("Starting the engine..."):
            return
        try:
            await asyncio.to_thread(self.logic.cachedCard, model)  # read and checked in a worker thread
            job = self.logic.segment(
                self.volume, outputSegmentation=self.segmentation, replaceExisting=self.segmentation is not None,
                model=model, options=options, waitForCompletion=False, progress=on_event,
            )
        except UNet3DSegmentError as error:
            self._report(error=str(error))
            return
        finally:
            self._end()
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
            raw = declared.from_panel(raw)  # the "Model's choice" notch below the range is None
            value = declared.parse(raw) if isinstance(raw, str) and declared.kind is not str else declared.check(raw)
            if declared.kind in (int, float) and not declared.choices and value is not None:
                low, high = declared.panel_range()
                low = declared.minimum if declared.auto_label and declared.minimum is not None else low
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
        names = ", ".join(s["name"] + (f" {s['volume_text']}" if s.get("volume_text") else "") for s in state.segments)
        state.update({"run_state": "done", "progress": 100, "progress_text": "Done"})
        warned = "".join(f" Warning: {message}" for message in self._warnings)
        self._report(info=f"Done: {names}.{warned}")

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
            figures = self._statistics.get(segment.GetName(), {})
            volume = figures.get("volume_ml")
            segments.append({"id": segment_id, "name": segment.GetName(), "color": _hex(segment.GetColor()),
                             "visible": visible, "volume_ml": volume,
                             "volume_text": f"{volume:.1f} mL" if isinstance(volume, (int, float)) else "",
                             "confidence": figures.get("confidence")})
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
        self._workers.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._temporary, ignore_errors=True)


def _volume_name(file_name: str) -> str:
    for suffix in (".nii.gz", ".nrrd", ".nii", ".mha"):
        if file_name.lower().endswith(suffix):
            return file_name[: -len(suffix)] or file_name
    return file_name
