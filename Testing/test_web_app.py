"""The browser front end: upload checks, the ``web`` command, and the page end to end in real chromium.

The end-to-end test starts ``unet3d-segment web`` on a free loopback port with a tiny model whose card
has pure red / green / blue class colours, drives Debian's headless chromium over the DevTools
protocol (aiohttp, which trame already needs), and checks what a user sees: an oversized file, a
wrong file type and an unreadable file are refused with a message; the demo MRI (block-averaged by
4 to stay fast) loads; Segment runs the engine in a child process to the end; the segment list names
the card's classes; the axial view shows each class's colour where the downloaded .seg.nrrd has
that class (and none before); a visibility toggle hides a colour; Cancel stops a run and keeps the
previous result; a broken model file fails with its error on the page while the volume stays
usable; an uploaded volume replaces the demo MRI.

``python Testing/test_web_app.py OUT.png`` makes the README screenshot (bundled model, full MRI).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from conftest import TINY_CARD, save_tiny_model

from UNet3DSegmentLib.cli.main import build_parser
from UNet3DSegmentLib.base.errors import BadInputError
from UNet3DSegmentLib.web.files import (
    check_upload,
    demo_volume_file,
    safe_file_name,
    upload_suffix,
    write_upload,
)

# Debian's chromium; UNET3D_CHROMIUM names another Chromium-based browser (e.g. google-chrome on CI runners).
CHROMIUM = next((shutil.which(n) for n in (os.environ.get("UNET3D_CHROMIUM", ""), "chromium", "chromium-browser")
                 if n and shutil.which(n)), None)
PAGE_SIZE = (1400, 900)
SCREENSHOT_SIZE = (1440, 1024)  # the README screenshot: tall enough for the whole panel
# Pure colours: over a grey MRI at Slicer's slice fill opacity one channel stays far above the others.
TEST_COLOURS = {"CSF": (255, 0, 0), "Grey matter": (0, 255, 0), "White matter": (0, 0, 255)}
DOMINANCE = 60  # channel margin that grey anatomy never reaches
MIN_PIXELS = 150


# --- uploads and the demo volume (no browser) ---------------------------------------------------
def test_upload_suffixes_and_names() -> None:
    assert [upload_suffix(n) for n in ("a.nrrd", "B.NII.GZ", "c.nii", "d.mha", "e.nii.gz.txt", "f.mhd")] == [
        ".nrrd", ".nii.gz", ".nii", ".mha", "", ""]
    assert safe_file_name("../../etc/passwd") == "passwd"
    assert safe_file_name("C:\\scans\\my scan (1).nii.gz") == "my_scan_1_.nii.gz"
    assert safe_file_name("...") == "volume"


def test_check_upload_refuses_type_size_and_empty_with_a_clear_message() -> None:
    assert check_upload("t1.nii.gz", 1024, max_mb=1) == ".nii.gz"
    with pytest.raises(BadInputError, match=r"notes\.txt is not a supported volume file; upload one of \.nrrd"):
        check_upload("notes.txt", 10)
    with pytest.raises(BadInputError, match=r"big\.nrrd is 3 MB, over the 2 MB upload limit"):
        check_upload("big.nrrd", 3 * 1024 * 1024, max_mb=2)
    with pytest.raises(BadInputError, match="is empty"):
        check_upload("empty.mha", 0)


def test_write_upload_joins_chunks_inside_the_folder(tmp_path: Path) -> None:
    path = write_upload({"name": "../x/scan.nrrd", "size": 6, "content": [b"abc", b"def"]}, tmp_path)
    assert path == tmp_path / "scan.nrrd" and path.read_bytes() == b"abcdef"
    with pytest.raises(BadInputError, match="without content"):
        write_upload({"name": "scan.nrrd", "size": 6}, tmp_path)
    with pytest.raises(BadInputError, match=r"scan\.nrrd is 0 MB, over the 1e-06 MB upload limit"):
        write_upload({"name": "scan.nrrd", "content": b"abcdef"}, tmp_path, max_mb=0.000001)


def test_demo_volume_downsampled_by_block_averaging(tmp_path: Path) -> None:
    import SimpleITK as sitk

    full = sitk.ReadImage(str(demo_volume_file(tmp_path, 1)), sitk.sitkFloat32)
    small = sitk.ReadImage(str(demo_volume_file(tmp_path, 4)))
    assert full.GetSize() == (197, 233, 189)
    assert small.GetSize() == (49, 58, 47)
    assert np.allclose(small.GetSpacing(), (4.0, 4.0, 4.0))
    block = sitk.GetArrayFromImage(full)[:4, :4, 40:44].mean()  # (z, y, x) block of voxel (10, 0, 0)
    assert sitk.GetArrayFromImage(small)[0, 0, 10] == pytest.approx(block, rel=1e-5)
    with pytest.raises(BadInputError, match="positive integer"):
        demo_volume_file(tmp_path, 0)


def test_web_command_defaults_to_loopback() -> None:
    args = build_parser().parse_args(["web"])
    assert (args.host, args.port, args.model, args.models_dir, args.max_upload_mb, args.demo_downsample) == (
        "127.0.0.1", 8080, None, None, 512.0, 1)
    args = build_parser().parse_args(["web", "--host", "0.0.0.0", "--port", "0", "--demo-downsample", "4"])
    assert (args.host, args.port, args.demo_downsample) == ("0.0.0.0", 0, 4)


# --- end to end in chromium ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chromium:
    """Headless chromium driven over the DevTools protocol (one page)."""

    def __init__(self, profile: Path) -> None:
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={PAGE_SIZE[0]},{PAGE_SIZE[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        marker = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (marker.is_file() and marker.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        self.port = int(marker.read_text().split()[0])
        self._id = 0

    async def connect(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as response:
            page = next(t for t in await response.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def send(self, method: str, **params):
        self._id += 1
        await self.ws.send_str(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def eval(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(0.25)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    async def click(self, element_id: str) -> None:
        await self.wait_for(f"!!document.getElementById('{element_id}') && "
                            f"!document.getElementById('{element_id}').disabled", 30, f"#{element_id} enabled")
        await self.eval(f"document.getElementById('{element_id}').click()")

    async def screenshot(self, rect: dict) -> np.ndarray:
        from PIL import Image

        clip = {"x": rect["x"], "y": rect["y"], "width": rect["width"], "height": rect["height"], "scale": 1}
        data = (await self.send("Page.captureScreenshot", format="png", clip=clip))["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)

    async def close(self) -> None:
        await self.session.close()
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(10)


def colour_pixels(image: np.ndarray, rgb: tuple) -> int:
    """Pixels where the colour's own channel(s) exceed the others by DOMINANCE (blended or outline)."""
    on = [c for c in range(3) if rgb[c] > 127]
    off = [c for c in range(3) if rgb[c] <= 127]
    mask = np.ones(image.shape[:2], bool)
    for c in on:
        for d in off:
            mask &= image[..., c] - image[..., d] > DOMINANCE
    return int(mask.sum())


def colour_counts(image: np.ndarray) -> dict:
    return {name: colour_pixels(image, rgb) for name, rgb in TEST_COLOURS.items()}


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    card = copy.deepcopy(TINY_CARD)
    for info in card["classes"][1:]:
        info["color"] = "#%02x%02x%02x" % TEST_COLOURS[info["name"]]
    folder = tmp_path_factory.mktemp("web_model")
    path = save_tiny_model(folder, card=card, name="colours")
    (folder / "broken.keras").write_bytes(b"not a keras file")  # same card, unreadable weights
    (folder / "broken.json").write_text(json.dumps(card))
    return path


@contextlib.contextmanager
def running_server(model: Optional[Path], log_path: Path, demo_downsample: int = 4, threads: int = 1,
                   max_upload_mb: float = 512, models_dir: Optional[Path] = None):
    """``unet3d-segment web`` on a free loopback port; yields the URL it prints (with the launch's token),
    stops it with SIGTERM (exit 0)."""
    port = free_port()
    command = [sys.executable, "-m", "UNet3DSegmentLib", "web", "--port", str(port),
               "--demo-downsample", str(demo_downsample), "--max-upload-mb", str(max_upload_mb)]
    if model is not None:
        command += ["--model", str(model)]
    if models_dir is not None:
        command += ["--models-dir", str(models_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            marker = "unet3d-segment web: open "
            while marker not in log_path.read_text(errors="replace"):  # printed once the port is bound
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"web server did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            line = next(l for l in log_path.read_text(errors="replace").splitlines() if marker in l)
            url = line.split(marker, 1)[1].strip()
            assert url.startswith(f"http://127.0.0.1:{port}/?secret=") and len(url.rsplit("=", 1)[1]) >= 40, url
            yield url
            os.killpg(process.pid, signal.SIGTERM)  # the command turns SIGTERM into a clean stop
            assert process.wait(30) == 0, log_path.read_text()[-2000:]
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


@pytest.fixture()
def web_server(colour_model: Path, tmp_path: Path):
    with running_server(colour_model, tmp_path / "server.log", max_upload_mb=1, models_dir=colour_model.parent) as url:
        yield url


RUN_STATE = "document.getElementById('run-state')?.textContent"
AXIAL_RECT = "JSON.parse(JSON.stringify(document.querySelector('.layout-grid-item').getBoundingClientRect()))"


async def _drive(url: str, colour_model: Path, work: Path) -> None:
    browser = Chromium(work / "profile")
    try:
        await browser.connect()
        await browser.send("Page.enable")
        await browser.send("Emulation.setDeviceMetricsOverride", width=PAGE_SIZE[0], height=PAGE_SIZE[1],
                           deviceScaleFactor=1, mobile=False)
        downloads = work / "downloads"
        downloads.mkdir()
        await browser.send("Page.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
        await browser.send("Page.navigate", url=url)
        await browser.wait_for("!!document.getElementById('load-demo')", 60, "the page (websocket) to come up")
        assert await browser.eval("document.getElementById('segment').disabled") is True  # no volume yet
        names = await browser.wait_for("[...document.querySelectorAll('#card-classes .v-chip')].map(e => e.innerText)"
                                       ".join('|')", 30, "the model card")
        assert [n.strip() for n in names.split("|")] == ["CSF", "Grey matter", "White matter"]
        # The model is chosen from a list fixed at launch: --model, the bundled model and --models-dir.
        listed = await browser.eval("window.trame.state.get('model_items').map(i => i.value)")
        assert str(colour_model) in listed and str(colour_model.with_name("broken.keras")) in listed, listed
        assert "secret=" not in await browser.eval("window.location.href")  # trame's client drops it from sight
        # A path the list does not offer is refused without a word about it (exists? what is next to it?).
        await browser.eval("window.trame.state.set('model_path', '/etc/hostname')")
        warning = await browser.wait_for("window.trame.state.get('card_error')", 30, "the refusal of an unlisted path")
        assert "choose one of the listed models" in warning and "hostname" not in warning, warning
        await browser.eval(f"window.trame.state.set('model_path', {json.dumps(str(colour_model))})")
        await browser.wait_for("window.trame.state.get('card_error') === '' && window.trame.state.get('card_title')",
                               30, "the listed model's card again")

        # A wrong file type is refused with a message; nothing is loaded.
        wrong = work / "notes.txt"
        wrong.write_text("not a volume")
        document = await browser.send("DOM.getDocument")
        node = await browser.send("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#upload")
        await browser.send("DOM.setFileInputFiles", files=[str(wrong)], nodeId=node["nodeId"])
        error = await browser.wait_for("document.getElementById('error')?.innerText", 30, "the upload error")
        assert "notes.txt is not a supported volume file; upload one of .nrrd" in error

        # Over the size limit (1 MB here): refused by the page before sending.
        big = work / "big.nrrd"
        big.write_bytes(bytes(2 * 1024 * 1024))
        await browser.send("DOM.setFileInputFiles", files=[str(big)], nodeId=node["nodeId"])
        error = await browser.wait_for("document.getElementById('error')?.innerText.includes('big') && "
                                       "document.getElementById('error').innerText", 30, "the size error")
        assert "big.nrrd is 2 MB, over the 1 MB upload limit" in error

        # A file with a volume suffix that is not a volume: refused, nothing loaded.
        garbage = work / "garbage.nrrd"
        garbage.write_bytes(b"NRRD0004\nthis is not a header\n")
        await browser.send("DOM.setFileInputFiles", files=[str(garbage)], nodeId=node["nodeId"])
        error = await browser.wait_for("document.getElementById('error')?.innerText.includes('garbage') && "
                                       "document.getElementById('error').innerText", 30, "the read error")
        assert "cannot read garbage.nrrd as a volume" in error
        assert await browser.eval("window.trame.state.get('volume_name')") == ""

        # The demo MRI is prepared by the server from its start, off its event loop (nilearn's first import
        # and a block-averaged copy); wait for that, which is slow once only on a cold machine, then load it.
        await browser.wait_for("window.trame.state.get('demo_ready')", 180, "the server to prepare the demo MRI")
        await browser.click("load-demo")
        info = await browser.wait_for("document.getElementById('info')?.innerText.includes('Loaded') && "
                                      "document.getElementById('info').innerText", 60, "the demo MRI")
        assert "MNI152 T1 (49 x 58 x 47 voxels)" in info
        await asyncio.sleep(2)  # let the views stream the new volume
        axial = await browser.eval(AXIAL_RECT)
        before = colour_counts(await browser.screenshot(axial))
        assert max(before.values()) < 20, before

        await browser.click("segment")
        assert await browser.wait_for(f"['done', 'failed', 'cancelled'].includes({RUN_STATE}) && {RUN_STATE}",
                                      240, "the segmentation to finish") == "done"
        listed = await browser.eval("[...document.querySelectorAll('#segment-list .segment-name')]"
                                    ".map(e => e.textContent.trim())")
        assert listed == ["CSF", "Grey matter", "White matter"]

        # The downloaded .seg.nrrd says which classes the axial view must show.
        await browser.click("download")
        deadline = time.monotonic() + 30
        while not list(downloads.glob("*.seg.nrrd")) or list(downloads.glob("*.crdownload")):
            assert time.monotonic() < deadline, "no .seg.nrrd downloaded"
            await asyncio.sleep(0.25)
        fractions = _downloaded_fractions(next(downloads.glob("*.seg.nrrd")))
        assert sorted(fractions) == sorted(TEST_COLOURS)
        expected = [name for name in TEST_COLOURS if fractions[name] > 0.05]
        assert expected, fractions
        counts = await _wait_for_colours(browser, axial, expected)
        assert all(counts[n] >= MIN_PIXELS for n in expected), (expected, counts)

        # Visibility toggle: the first shown class disappears from the axial view.
        hidden = expected[0]
        index = list(TEST_COLOURS).index(hidden)
        await browser.eval(f"document.querySelectorAll('#segment-list input[type=checkbox]')[{index}].click()")
        deadline = time.monotonic() + 20
        while colour_pixels(await browser.screenshot(axial), TEST_COLOURS[hidden]) >= 20:
            assert time.monotonic() < deadline, f"{hidden} still shown after hiding it"
            await asyncio.sleep(0.5)

        # Cancel right after starting: the run stops, the previous result stays.
        await browser.click("segment")
        await browser.wait_for(f"{RUN_STATE} === 'running'", 30, "the second run to start")
        await browser.click("cancel")
        assert await browser.wait_for(f"['done', 'failed', 'cancelled'].includes({RUN_STATE}) && {RUN_STATE}",
                                      60, "the cancel") == "cancelled"
        assert "Cancelled" in await browser.eval("document.getElementById('info').innerText")
        assert await browser.eval("document.querySelectorAll('#segment-list .segment-name').length") == 3

        # A broken model file: the engine fails, the page says why, the volume stays loaded and usable.
        broken = colour_model.with_name("broken.keras")
        await browser.eval(f"window.trame.state.set('model_path', {json.dumps(str(broken))})")
        await browser.click("segment")
        await browser.wait_for(f"{RUN_STATE} !== 'cancelled'", 30, "the third run to start")
        assert await browser.wait_for(f"['done', 'failed', 'cancelled'].includes({RUN_STATE}) && {RUN_STATE}",
                                      120, "the failing run") == "failed"
        error = await browser.eval("document.getElementById('error').innerText")
        assert "Segmentation failed:" in error and "broken.keras" in error, error
        assert await browser.eval("document.getElementById('segment').disabled") is False
        assert await browser.eval("window.trame.state.get('volume_name')") == "MNI152 T1"

        # Upload a real volume: it replaces the demo MRI and its result.
        volume = demo_volume_file(work, 4)
        await browser.send("DOM.setFileInputFiles", files=[str(volume)], nodeId=node["nodeId"])
        info = await browser.wait_for("document.getElementById('info')?.innerText.includes('Loaded mni') && "
                                      "document.getElementById('info').innerText", 60, "the uploaded volume")
        assert "Loaded mni152_t1_downsampled_4 (49 x 58 x 47 voxels)" in info
        assert await browser.eval("document.querySelectorAll('#segment-list .segment-name').length") == 0
    finally:
        await browser.close()


def _downloaded_fractions(path: Path) -> dict:
    """Share of the volume each named segment covers in a downloaded .seg.nrrd (slicerio)."""
    import slicerio

    segmentation = slicerio.read_segmentation(str(path))
    voxels = np.asarray(segmentation["voxels"])
    fractions = {}
    for segment in segmentation["segments"]:
        layer = voxels if voxels.ndim == 3 else voxels[..., segment.get("layer", 0)]
        fractions[segment["name"]] = float((layer == segment["labelValue"]).mean())
    return fractions


async def _wait_for_colours(browser: Chromium, rect: dict, expected: list, timeout: float = 20.0) -> dict:
    """Colour counts of the axial view once every expected colour shows (views stream asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = colour_counts(await browser.screenshot(rect))
        if all(counts[n] >= MIN_PIXELS for n in expected) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.5)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium, or set "
                                             "UNET3D_CHROMIUM); the browser test needs it")
def test_page_segments_the_demo_mri_in_chromium(web_server: str, colour_model: Path, tmp_path: Path) -> None:
    asyncio.run(_drive(web_server, colour_model, tmp_path))


# --- the README screenshot (not a test) -----------------------------------------------------------
async def _capture_page(url: str, output: Path, work: Path, overlap: float, timeout: float) -> None:
    """Load the demo MRI, segment it with the server's model, save a screenshot of the whole page."""
    from PIL import Image

    browser = Chromium(work / "profile")
    try:
        await browser.connect()
        await browser.send("Emulation.setDeviceMetricsOverride", width=SCREENSHOT_SIZE[0],
                           height=SCREENSHOT_SIZE[1], deviceScaleFactor=1, mobile=False)
        await browser.send("Page.navigate", url=url)
        await browser.wait_for("!!document.getElementById('load-demo')", 60, "the page")
        await browser.click("load-demo")
        await browser.wait_for("document.getElementById('info')?.innerText.includes('Loaded')", 120, "the demo MRI")
        await browser.eval(f"window.trame.state.set('overlap', {float(overlap)})")
        await browser.click("segment")
        state = await browser.wait_for(f"['done', 'failed', 'cancelled'].includes({RUN_STATE}) && {RUN_STATE}",
                                       timeout, "the segmentation")
        if state != "done":
            raise SystemExit(f"segmentation {state}: {await browser.eval('document.body.innerText')}")
        await asyncio.sleep(5)  # views stream their last frames
        data = (await browser.send("Page.captureScreenshot", format="png"))["data"]
        Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").save(output, optimize=True)
    finally:
        await browser.close()


def main() -> None:
    """``python Testing/test_web_app.py OUTPUT.png [--model M]``: the page after segmenting the demo MRI."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("--model", type=Path, help="default: the bundled demo model")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if CHROMIUM is None:
        raise SystemExit("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        with running_server(args.model, work / "server.log", demo_downsample=1, threads=2) as url:
            asyncio.run(_capture_page(url, args.output, work, args.overlap, args.timeout))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()


def test_overlap_slider_label_is_a_valid_attribute_and_says_model_choice():
    """The notch below 0 is "Model's choice": the label expression must not break its double-quoted attribute."""
    import re

    from trame.app import get_server
    from trame.ui.html import DivLayout

    from UNet3DSegmentLib.base.options import SegmentOptions
    from UNet3DSegmentLib.web.ui import option_control

    server = get_server("overlap-label-test", client_type="vue3")
    with DivLayout(server) as layout:
        option_control(SegmentOptions.spec("overlap"))
    html = layout.html
    label = re.search(r':label="([^"]*)"', html).group(1)
    assert label == "overlap < 0.0 ? `Overlap: Model's choice` : `Overlap`"
    assert 'min="-0.05"' in html and 'max="0.95"' in html
