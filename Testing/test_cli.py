"""The ``unet3d-segment segment`` command, through ``main(argv)`` and as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import oblique_anisotropic_image, save_tiny_model
from UNet3DSegmentLib.base import errors
from UNet3DSegmentLib.cli.main import main


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.fixture(scope="module")
def oblique_nrrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "oblique.nrrd"
    sitk.WriteImage(oblique_anisotropic_image(), str(path))
    return path


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_segment_oblique_anisotropic_keeps_geometry(tmp_path: Path, oblique_nrrd: Path, tiny_model_path: Path):
    output = tmp_path / "labels.nrrd"
    code = main(["segment", str(oblique_nrrd), "-o", str(output), "--model", str(tiny_model_path),
                 "--progress", "none", "--overlap", "0.25"])
    assert code == 0
    labels = sitk.ReadImage(str(output))
    assert_same_geometry(labels, sitk.ReadImage(str(oblique_nrrd)))
    values = set(np.unique(sitk.GetArrayFromImage(labels)).tolist())
    assert values <= {0, 1, 2, 3} and values
    assert files_in(tmp_path) == ["labels.nrrd"]


def test_segment_matches_direct_model_on_single_patch(tmp_path: Path, tiny_model_path: Path):
    """A volume of exactly one patch: the labelmap equals argmax of the model's own output."""
    import keras

    rng = np.random.default_rng(3)
    array = rng.normal(50, 10, size=(16, 16, 16)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    path = tmp_path / "patch.nii.gz"
    sitk.WriteImage(image, str(path))
    output = tmp_path / "out.nii.gz"
    assert main(["segment", str(path), "-o", str(output), "--model", str(tiny_model_path),
                 "--progress", "none", "--blend", "constant", "--precision", "fp32"]) == 0
    model = keras.saving.load_model(tiny_model_path, compile=False)
    normalised = (array - array[array != 0].mean()) / array[array != 0].std()
    expected = np.argmax(model(normalised[None, ..., None], training=False).numpy()[0], axis=-1)
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    assert (got == expected).mean() > 0.999


def test_seg_nrrd_has_named_coloured_segments(tmp_path: Path, oblique_nrrd: Path, tiny_model_path: Path):
    import slicerio

    output = tmp_path / "result.seg.nrrd"
    assert main(["segment", str(oblique_nrrd), "-o", str(output), "--model", str(tiny_model_path),
                 "--progress", "none"]) == 0
    segmentation = slicerio.read_segmentation(str(output))
    names = [s["name"] for s in segmentation["segments"]]
    assert names == ["CSF", "Grey matter", "White matter"]
    csf = segmentation["segments"][0]
    np.testing.assert_allclose(csf["color"], [0x4A / 255, 0x90 / 255, 0xD9 / 255], atol=1e-3)
    assert [s["labelValue"] for s in segmentation["segments"]] == [1, 2, 3]


def test_existing_output_is_not_replaced_without_overwrite(tmp_path: Path, oblique_nrrd: Path,
                                                          tiny_model_path: Path, capsys):
    output = tmp_path / "labels.nrrd"
    output.write_bytes(b"precious")
    code = main(["segment", str(oblique_nrrd), "-o", str(output), "--model", str(tiny_model_path),
                 "--progress", "none"])
    assert code == errors.EXIT_BAD_INPUT
    assert output.read_bytes() == b"precious"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert main(["segment", str(oblique_nrrd), "-o", str(output), "--model", str(tiny_model_path),
                 "--progress", "none", "--overwrite"]) == 0
    assert sitk.ReadImage(str(output)).GetSize() == sitk.ReadImage(str(oblique_nrrd)).GetSize()


@pytest.mark.parametrize(
    "case, expected_code, expected_text",
    [
        ("missing-input", errors.EXIT_BAD_INPUT, "does not exist"),
        ("bad-extension", errors.EXIT_BAD_INPUT, ".txt"),
        ("missing-model", errors.EXIT_BAD_MODEL, "missing.keras"),
        ("corrupt-model", errors.EXIT_BAD_MODEL, "corrupt.keras"),
        ("two-channels-for-one", errors.EXIT_BAD_INPUT, "1 input volume"),
    ],
)
def test_error_kinds_give_one_line_and_exit_code(case, expected_code, expected_text, tmp_path: Path,
                                                 oblique_nrrd: Path, tiny_model_path: Path, capsys):
    inputs, output, model = [str(oblique_nrrd)], tmp_path / "out.nrrd", str(tiny_model_path)
    if case == "missing-input":
        inputs = [str(tmp_path / "nope.nrrd")]
    elif case == "bad-extension":
        output = tmp_path / "out.txt"
    elif case == "missing-model":
        model = str(tmp_path / "missing.keras")
    elif case == "corrupt-model":
        model = str(tmp_path / "corrupt.keras")
        Path(model).write_bytes(b"not a zip file")
    elif case == "two-channels-for-one":
        inputs = [str(oblique_nrrd), str(oblique_nrrd)]
    code = main(["segment", *inputs, "-o", str(output), "--model", model, "--progress", "none"])
    assert code == expected_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("unet3d-segment: error:") and expected_text in err[0]
    assert files_in(tmp_path) == sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".keras")


def test_bad_overlap_is_a_usage_error(tmp_path: Path, oblique_nrrd: Path, capsys):
    """A usage error is bad input: one line, exit 3 (issue 12; argparse's usage block and exit 2 before)."""
    code = main(["segment", str(oblique_nrrd), "-o", str(tmp_path / "o.nrrd"), "--overlap", "1.2"])
    assert code == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["unet3d-segment: error: argument --overlap: overlap must be >= 0 and < 1, got 1.2; "
                   "see 'unet3d-segment segment --help'"]


def run_engine(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "UNet3DSegmentLib", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_process_json_progress(tmp_path: Path, oblique_nrrd: Path, tiny_model_path: Path):
    output = tmp_path / "labels.seg.nrrd"
    process = run_engine(["segment", str(oblique_nrrd), "-o", str(output), "--model", str(tiny_model_path),
                          "--progress", "json", "--overlap", "0.5"])
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    stages = [e["stage"] for e in events]
    assert stages[0] == "load" and stages[-1] == "done"
    patches = [e for e in events if e["stage"] == "inference"]
    # 20x24x28 image, 16^3 patches, overlap 0.5 (step <= 8) -> 2 x 2 x 3 tiles, batches of 2.
    assert patches[-1]["done"] == patches[-1]["total"] == 12
    assert [e["done"] for e in patches] == [2, 4, 6, 8, 10, 12]
    assert events[-1]["output"] == str(output) and output.exists()
    assert all({"stage", "done", "total", "seconds", "message"} <= set(e) for e in events)


def test_process_error_is_json_line_and_exit_code(tmp_path: Path, oblique_nrrd: Path):
    process = run_engine(["segment", str(oblique_nrrd), "-o", str(tmp_path / "o.nrrd"), "--model",
                          str(tmp_path / "missing.keras"), "--progress", "json"])
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == errors.EXIT_BAD_MODEL
    last = json.loads(stdout.splitlines()[-1])
    assert last["stage"] == "error" and last["kind"] == "bad-model" and last["exit_code"] == 4
    assert stderr.strip().count("\n") == 0 and "missing.keras" in stderr


def test_sigterm_cancels_and_leaves_nothing(tmp_path: Path, tiny_model_path: Path):
    big = tmp_path / "input" / "big.nrrd"
    big.parent.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((96, 96, 96), np.float32)), str(big))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = run_engine(["segment", str(big), "-o", str(out_dir / "labels.seg.nrrd"), "--model",
                          str(tiny_model_path), "--progress", "json", "--overlap", "0.75", "--batch-size", "1"])
    deadline = time.time() + 120
    for line in process.stdout:
        if json.loads(line)["stage"] == "inference" or time.time() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == errors.EXIT_CANCELLED
    assert json.loads(stdout.splitlines()[-1])["kind"] == "cancelled"
    assert files_in(out_dir) == []


def test_failed_labelmap_write_removes_the_probabilities(tmp_path: Path, oblique_nrrd: Path,
                                                          tiny_model_path: Path, monkeypatch, capsys):
    """No half-finished run: when the labelmap cannot be written, the probabilities are not written either."""
    from UNet3DSegmentLib.engine import image_io

    def broken_writer(*args, **kwargs):
        def write(temp):
            temp.write_bytes(b"half")
            raise OSError(28, "disk full")
        return write

    monkeypatch.setattr(image_io, "labelmap_writer", broken_writer)
    code = main(["segment", str(oblique_nrrd), "-o", str(tmp_path / "labels.nrrd"), "--model",
                 str(tiny_model_path), "--probabilities", str(tmp_path / "probs.nrrd"), "--progress", "none"])
    assert code == errors.EXIT_BAD_INPUT
    assert "disk full" in capsys.readouterr().err
    assert files_in(tmp_path) == []
