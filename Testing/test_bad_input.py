"""Bad input (issue 12): each fault gets one clear line and the right exit code, never a silent
wrong result. One test (or more) per row of docs/RELIABILITY.md; the table names them."""

from __future__ import annotations

import copy
import gzip
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TINY_CARD
from UNet3DSegmentLib.base import errors
from UNet3DSegmentLib.base.errors import BadInputError, BadModelError, CancelledError, OutOfMemoryError
from UNet3DSegmentLib.cli.main import main
from UNet3DSegmentLib.engine import image_io
from UNet3DSegmentLib.engine.card import card_from_dict
from UNet3DSegmentLib.engine.image_io import atomic_write, read_image
from UNet3DSegmentLib.runtime.fallback import FallbackPredictor


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def run_engine(args: list[str]) -> subprocess.CompletedProcess:
    """The command line as its own process (TensorFlow's start-up chatter kept off by its own setting)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "UNet3DSegmentLib", *args], capture_output=True, text=True,
                          env=env, timeout=180)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("unet3d-segment: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def small_nrrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    values = np.random.default_rng(1).normal(100.0, 20.0, size=(16, 16, 16)).astype(np.float32)
    path = tmp_path_factory.mktemp("small") / "small.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    return path


# ------------------------------------------------------------------------- 4. cards with many classes
def _card_with_classes(count: int) -> dict:
    card = copy.deepcopy(TINY_CARD)
    card["classes"] = [{"name": f"class {i}"} for i in range(count)]
    return card


def test_card_with_too_many_classes_is_refused_at_once():
    start = time.perf_counter()
    with pytest.raises(BadModelError, match=r"classes has 40000 classes, more than the 1000 this engine supports"):
        card_from_dict(_card_with_classes(40_000), source="huge.json")
    assert time.perf_counter() - start < 1.0


def test_duplicate_class_names_are_found_in_linear_time():
    card = _card_with_classes(1000)
    start = time.perf_counter()
    assert card_from_dict(card).num_classes == 1000
    card["classes"][-1]["name"] = "class 3"
    with pytest.raises(BadModelError, match=r"classes\[999\]\.name repeats 'class 3'"):
        card_from_dict(card)
    assert time.perf_counter() - start < 1.0


def test_card_with_too_many_channels_is_refused():
    card = copy.deepcopy(TINY_CARD)
    card["input"]["channels"] = [f"c{i}" for i in range(65)]
    with pytest.raises(BadModelError, match=r"input.channels has 65 channels, more than the 64 this engine supports"):
        card_from_dict(card)


def test_oversized_card_file_is_refused_before_parsing(tmp_path: Path):
    from UNet3DSegmentLib.engine.card import load_card

    path = tmp_path / "big.json"
    with open(path, "wb") as stream:
        stream.truncate(17 * 1024 * 1024)  # sparse: 17 MiB of nothing
    with pytest.raises(BadModelError, match=r"^model card .*big.json is 17 MiB, more than the 16 MiB a card may have"):
        load_card(path)


# ------------------------------------------------------------------------- 5. NaN / Inf voxels
def _native_card(method: str = "zscore-nonzero", spacing="native"):
    return SimpleNamespace(input=SimpleNamespace(
        channels=("T1",), spacing=spacing, orientation="native",
        normalization=SimpleNamespace(method=method, params={}), crop_to_nonzero=False,
    ))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", ["zscore-nonzero", "percentile-zscore", "none"])
def test_non_finite_voxels_are_set_to_zero_with_a_counted_warning(bad, method):
    from UNet3DSegmentLib.engine.preprocessing import prepare

    values = np.random.default_rng(2).normal(100.0, 20.0, size=(8, 9, 10)).astype(np.float32)
    clean = values.copy()
    clean[1, 2, 3] = clean[4, 5, 6] = 0.0
    values[1, 2, 3] = values[4, 5, 6] = bad
    with np.errstate(all="raise"):  # no numpy floating-point warning on the way
        prepared = prepare([sitk.GetImageFromArray(values)], _native_card(method))
        reference = prepare([sitk.GetImageFromArray(clean)], _native_card(method))
    assert np.isfinite(prepared.array).all()
    np.testing.assert_array_equal(prepared.array, reference.array)
    assert prepared.warnings == (
        "input channel T1 has 2 non-finite voxel(s) (NaN or Inf) out of 720; they were set to 0 "
        "(fix the volume if they are not meant to be empty)",
    )


def test_all_non_finite_channel_is_refused():
    from UNet3DSegmentLib.engine.preprocessing import prepare

    with pytest.raises(BadInputError, match=r"^input channel T1 holds no finite voxel \(all NaN or Inf\)"):
        prepare([sitk.GetImageFromArray(np.full((4, 4, 4), np.nan, np.float32))], _native_card())


def test_one_nan_voxel_does_not_blank_the_result(tiny_model_path: Path, tmp_path: Path):
    """As a process: same labels as with that voxel at 0, a JSON warning event, nothing on stderr."""
    values = np.random.default_rng(4).normal(50.0, 10.0, size=(16, 16, 16)).astype(np.float32)
    values[8, 8, 8] = 0.0
    clean, dirty = tmp_path / "clean.nrrd", tmp_path / "dirty.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(clean))
    values[8, 8, 8] = np.inf  # Inf (unlike NaN) also made numpy print RuntimeWarnings on stderr
    sitk.WriteImage(sitk.GetImageFromArray(values), str(dirty))
    common = ["--model", str(tiny_model_path), "--precision", "fp32"]
    assert main(["segment", str(clean), "-o", str(tmp_path / "clean-labels.nrrd"), *common,
                 "--progress", "none"]) == 0
    done = run_engine(["segment", str(dirty), "-o", str(tmp_path / "dirty-labels.nrrd"), *common,
                       "--progress", "json"])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["message"] for e in events if e["stage"] == "warning"] == [
        "input channel T1 has 1 non-finite voxel(s) (NaN or Inf) out of 4096; they were set to 0 (fix the "
        "volume if they are not meant to be empty)"]
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "clean-labels.nrrd")))
    assert expected.any()  # the tiny model does not label everything background
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "dirty-labels.nrrd"))),
                                  expected)


# ------------------------------------------------------------------------- 6. truncated files
def _nifti_image(shape_zyx=(20, 20, 20)) -> bytes:
    values = np.random.default_rng(3).normal(100.0, 20.0, size=shape_zyx).astype(np.float32)
    return sitk.GetImageFromArray(values)


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_truncated_nifti_is_refused(tmp_path: Path, name: str):
    whole = tmp_path / ("whole" + name[3:])
    sitk.WriteImage(_nifti_image(), str(whole), name.endswith(".gz"))
    data = whole.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    read_image(whole)  # the complete file reads
    with pytest.raises(BadInputError, match=rf"^input {cut} is truncated( or damaged)?: .*; copy or export it again"):
        read_image(cut)


def test_truncated_nifti_through_the_command_line(tmp_path: Path, tiny_model_path: Path, capsys):
    whole = tmp_path / "whole.nii.gz"
    sitk.WriteImage(_nifti_image(), str(whole), True)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole.read_bytes()[:-2000])
    code = main(["segment", str(cut), "-o", str(tmp_path / "out.nrrd"), "--model", str(tiny_model_path),
                 "--progress", "none"])
    assert code == errors.EXIT_BAD_INPUT
    assert "is truncated" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out.nrrd").exists()


def _huge_nifti_header(path: Path, side: int = 1000) -> None:
    """A small .nii.gz whose header claims side^3 float32 voxels (4 GB for 1000)."""
    small = path.with_name("small.nii")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32)), str(small))
    data = bytearray(small.read_bytes())
    struct.pack_into("<3h", data, 42, side, side, side)  # dim[1..3]
    path.write_bytes(gzip.compress(bytes(data)))
    small.unlink()


def test_header_claiming_more_than_the_file_holds_is_refused_before_reading(tmp_path: Path):
    """A 1 KB .nii.gz claiming 1000^3 voxels: refused without allocating the 4 GB it claims."""
    path = tmp_path / "liar.nii.gz"
    _huge_nifti_header(path)
    assert path.stat().st_size < 2048
    script = (
        "import resource, sys\n"
        "from UNet3DSegmentLib.engine.image_io import read_image\n"
        "from UNet3DSegmentLib.base.errors import BadInputError\n"
        "try:\n"
        f"    read_image({str(path)!r})\n"
        "except BadInputError as error:\n"
        "    print(error)\n"
        # VmHWM: this process's own peak (ru_maxrss would count pytest's memory, copied at fork, too)
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    message, peak_kib = done.stdout.strip().splitlines()
    assert message.startswith(f"input {path} is truncated: its header claims 1000x1000x1000 voxels")
    assert int(peak_kib) < 1024 * 1024, f"peak memory {int(peak_kib) // 1024} MiB"


def test_header_claiming_more_than_this_machine_holds_is_out_of_memory(tmp_path: Path):
    path = tmp_path / "huge.nhdr"
    (tmp_path / "huge.raw").write_bytes(b"\0" * 64)
    path.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\n"
                    "encoding: raw\nendian: little\ndata file: huge.raw\n\n")
    with pytest.raises(OutOfMemoryError, match=r"^input .*huge.nhdr needs [0-9.]+ GiB for its 100000x100000x100000 "
                                               r"voxels, more than this machine's memory"):
        read_image(path)


# ------------------------------------------------------------------------- 7. resample grid too large
def test_resample_grid_too_large_is_out_of_memory_with_the_size():
    from UNet3DSegmentLib.engine.preprocessing import prepare

    image = sitk.GetImageFromArray(np.ones((20, 24, 28), np.float32))
    with pytest.raises(OutOfMemoryError, match=r"^resampling to the model's spacing \(0\.001, 0\.001, 0\.001\) mm "
                                               r"makes a grid of 28000x24000x20000 voxels \([0-9.]+ GiB for the "
                                               r"input alone\), more than this machine"):
        prepare([image], _native_card(spacing=(0.001, 0.001, 0.001)))


def test_allocation_failure_of_itk_is_out_of_memory():
    error = RuntimeError("Exception thrown in SimpleITK ResampleImageFilter_Execute: itkImportImageContainer.hxx:179:"
                         "\nFailed to allocate memory for image.")
    assert errors.is_out_of_memory(error)


# ------------------------------------------------------------------------- 8. CPU out-of-memory fallback
class RawMemoryErrors:
    """A CPU predictor whose allocator fails (Python MemoryError) above ``limit`` patches."""

    def __init__(self, limit: int) -> None:
        self.limit, self.sizes = limit, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(batch.shape[0])
        if batch.shape[0] > self.limit:
            raise MemoryError("Unable to allocate 3.00 GiB for an array")
        return batch * 2


def test_cpu_fallback_keeps_halving_to_one_patch():
    device, warnings = RawMemoryErrors(1), []
    predictor = FallbackPredictor(device, device="cpu", warn=warnings.append)
    batch = np.ones((8, 2, 2, 2, 1), np.float32)
    np.testing.assert_array_equal(predictor(batch), batch * 2)
    assert warnings == [f"out of memory on cpu with {n} patches per model call; retrying with {n // 2}"
                        for n in (8, 4, 2)]
    assert predictor.rows == 1


def test_cpu_out_of_memory_advice_does_not_send_to_the_cpu():
    predictor = FallbackPredictor(RawMemoryErrors(0), device="cpu")
    with pytest.raises(OutOfMemoryError) as caught:
        predictor(np.ones((2, 2, 2, 2, 1), np.float32))
    message = str(caught.value)
    assert message.startswith("out of memory on the CPU even with 1 patch per model call; close other programs")
    assert "--device cpu" not in message and "another device" not in message


def test_gpu_out_of_memory_without_cpu_copy_advises_the_cpu():
    predictor = FallbackPredictor(RawMemoryErrors(0), device="gpu:0")
    with pytest.raises(OutOfMemoryError, match=r"^out of memory on gpu:0 even with 1 patch per model call; .*"
                                               r"--device cpu"):
        predictor(np.ones((1, 2, 2, 2, 1), np.float32))


def test_unhandled_out_of_memory_advice_fits_the_device(small_nrrd: Path, tmp_path: Path, monkeypatch, capsys):
    """An allocation failure outside the predictor (here: in preprocessing) on the CPU."""
    from UNet3DSegmentLib.engine import pipeline

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr("UNet3DSegmentLib.engine.preprocessing.prepare", no_memory)
    code = main(["segment", str(small_nrrd), "-o", str(tmp_path / "o.nrrd"), "--device", "cpu",
                 "--progress", "none"])
    assert code == errors.EXIT_OUT_OF_MEMORY
    line = _one_error_line(capsys.readouterr().err)
    assert "on the CPU" in line and "--device cpu" not in line
    assert pipeline  # imported: the patch above replaces what segment_images imports


# ------------------------------------------------------------------------- 9. one line on stderr
@pytest.mark.parametrize("argv, expected", [
    (["segment", "in.nrrd", "-o", "o.nrrd", "--overlap", "1.2"], "overlap must be >= 0 and < 1, got 1.2"),
    (["segment", "in.nrrd"], "the following arguments are required: -o/--output"),
    (["segment", "in.nrrd", "-o", "o.nrrd", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
])
def test_usage_errors_are_one_line_exit_3(argv, expected, capsys):
    assert main(argv) == errors.EXIT_BAD_INPUT
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert expected in line and "--help" in line
    assert captured.out == ""


def test_usage_error_with_json_progress_is_a_json_error_event():
    done = run_engine(["segment", "in.nrrd", "-o", "o.nrrd", "--progress", "json", "--batch-size", "0"])
    assert done.returncode == errors.EXIT_BAD_INPUT
    line = _one_error_line(done.stderr)
    assert done.stdout.count("\n") == 1
    event = json.loads(done.stdout)
    assert event["stage"] == "error" and event["kind"] == "bad-input" and event["exit_code"] == 3
    assert event["message"] == line[len("unet3d-segment: error: "):]


def test_help_still_exits_0(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["segment", "--help"])
    assert caught.value.code == 0
    assert "--overlap" in capsys.readouterr().out


def test_folder_without_dicom_prints_no_itk_warning(tmp_path: Path, tiny_model_path: Path, capfd):
    folder = tmp_path / "notdicom"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    code = main(["segment", str(folder), "-o", str(tmp_path / "o.nrrd"), "--model", str(tiny_model_path),
                 "--progress", "none"])
    assert code == errors.EXIT_BAD_INPUT
    assert "holds no DICOM series" in _one_error_line(capfd.readouterr().err)


# ------------------------------------------------------------------------- 11. stale temporaries, SIGTERM
def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path: Path):
    dead = _dead_pid()
    stale = tmp_path / f".p.tmp-{dead}-0123abcd.nrrd"
    fresh = tmp_path / f".q.tmp-{dead}-0123abce.nrrd"  # under a minute old: maybe still being written
    living = tmp_path / f".r.tmp-{os.getpid()}-0123abcf.nrrd"
    foreign = tmp_path / ".s.tmp-0123abcd.nrrd"  # not our naming (no pid): left alone
    for path in (stale, fresh, living, foreign):
        path.write_bytes(b"x" * 100)
    old = time.time() - 120
    for path in (stale, living, foreign):
        os.utime(path, (old, old))
    atomic_write(tmp_path / "out.nrrd", lambda temp: temp.write_bytes(b"new"), overwrite=False)
    assert _files(tmp_path) == sorted(p.name for p in (fresh, living, foreign)) + ["out.nrrd"]


def test_temporary_names_carry_the_pid(tmp_path: Path):
    seen = []
    atomic_write(tmp_path / "out.nii.gz", lambda temp: (seen.append(temp.name), temp.write_bytes(b"1")),
                 overwrite=False)
    assert seen[0].startswith(f".out.tmp-{os.getpid()}-") and seen[0].endswith(".nii.gz")


def test_cancel_during_writing_cancels_and_replaces_nothing(small_nrrd: Path, tiny_model_path: Path,
                                                           tmp_path: Path, monkeypatch):
    from UNet3DSegmentLib.engine.pipeline import segment_files

    output = tmp_path / "labels.nrrd"
    output.write_bytes(b"old labels")
    cancel = threading.Event()
    real_write = image_io.sitk.WriteImage

    def write_then_sigterm(*args, **kwargs):
        real_write(*args, **kwargs)
        cancel.set()  # as the SIGTERM handler does

    monkeypatch.setattr(image_io.sitk, "WriteImage", write_then_sigterm)
    with pytest.raises(CancelledError, match="nothing was written"):
        segment_files([small_nrrd], output, model=tiny_model_path, cancel=cancel, overwrite=True)
    assert output.read_bytes() == b"old labels"
    assert _files(tmp_path) == ["labels.nrrd"]


# ------------------------------------------------------------------------- 12. both outputs or neither
def test_failed_labelmap_commit_keeps_the_old_probabilities(small_nrrd: Path, tiny_model_path: Path,
                                                            tmp_path: Path, monkeypatch, capsys):
    labels, probabilities = tmp_path / "labels.nrrd", tmp_path / "probs.nrrd"
    labels.write_bytes(b"old labels")
    probabilities.write_bytes(b"old probabilities")
    real_replace = os.replace

    def failing_replace(source, destination):
        if Path(destination) == labels:
            raise OSError(28, "No space left on device")
        return real_replace(source, destination)

    monkeypatch.setattr(image_io.os, "replace", failing_replace)
    code = main(["segment", str(small_nrrd), "-o", str(labels), "--model", str(tiny_model_path),
                 "--probabilities", str(probabilities), "--overwrite", "--progress", "none"])
    assert code == errors.EXIT_BAD_INPUT
    assert "No space left on device" in _one_error_line(capsys.readouterr().err)
    assert labels.read_bytes() == b"old labels"
    assert probabilities.read_bytes() == b"old probabilities"
    assert _files(tmp_path) == ["labels.nrrd", "probs.nrrd"]


def test_failed_labelmap_write_leaves_both_old_outputs(small_nrrd: Path, tiny_model_path: Path,
                                                       tmp_path: Path, monkeypatch, capsys):
    labels, probabilities = tmp_path / "labels.nrrd", tmp_path / "probs.nrrd"
    labels.write_bytes(b"old labels")
    probabilities.write_bytes(b"old probabilities")
    real_write = image_io.sitk.WriteImage

    def failing_write(image, name, *args):
        if image.GetNumberOfComponentsPerPixel() == 1:  # the labelmap
            raise RuntimeError("ITK: disk full")
        return real_write(image, name, *args)

    monkeypatch.setattr(image_io.sitk, "WriteImage", failing_write)
    code = main(["segment", str(small_nrrd), "-o", str(labels), "--model", str(tiny_model_path),
                 "--probabilities", str(probabilities), "--overwrite", "--progress", "none"])
    assert code == errors.EXIT_BAD_INPUT
    assert "disk full" in _one_error_line(capsys.readouterr().err)
    assert (labels.read_bytes(), probabilities.read_bytes()) == (b"old labels", b"old probabilities")
    assert _files(tmp_path) == ["labels.nrrd", "probs.nrrd"]


def test_both_outputs_are_committed_together(small_nrrd: Path, tiny_model_path: Path, tmp_path: Path):
    labels, probabilities = tmp_path / "labels.nrrd", tmp_path / "probs.nrrd"
    labels.write_bytes(b"old labels")
    probabilities.write_bytes(b"old probabilities")
    assert main(["segment", str(small_nrrd), "-o", str(labels), "--model", str(tiny_model_path),
                 "--probabilities", str(probabilities), "--overwrite", "--progress", "none"]) == 0
    assert sitk.ReadImage(str(labels)).GetSize() == (16, 16, 16)
    assert sitk.ReadImage(str(probabilities)).GetNumberOfComponentsPerPixel() == 4
    assert _files(tmp_path) == ["labels.nrrd", "probs.nrrd"]


# ------------------------------------------------------------------------- the table in step with the tests
def test_reliability_table_names_existing_tests_and_every_test_here():
    """docs/RELIABILITY.md names each of its tests as `Testing/<file>.py::<test>`: they must exist, and
    every test of this file must be in the table."""
    import re

    root = Path(__file__).resolve().parent.parent
    table = (root / "docs" / "RELIABILITY.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(Testing/[\w/]+\.py)::(test_\w+)`", table))
    assert named
    for file, test in sorted(named):
        assert re.search(rf"^def {test}\(", (root / file).read_text(encoding="utf-8"), re.M), f"{file}::{test}"
    here = set(re.findall(r"^def (test_\w+)\(", Path(__file__).read_text(encoding="utf-8"), re.M))
    here.discard("test_reliability_table_names_existing_tests_and_every_test_here")
    assert here - {test for file, test in named if file == "Testing/test_bad_input.py"} == set()


def test_scaled_nifti_is_read_not_called_truncated(tmp_path: Path):
    """int16 voxels with scl_slope 2 (as scanners and dcm2niix write): ITK reports float, the file holds int16."""
    nibabel = pytest.importorskip("nibabel")
    values = np.arange(20 * 22 * 24, dtype=np.int16).reshape(20, 22, 24) % 300
    for name in ("scaled.nii", "scaled.nii.gz"):
        image = nibabel.Nifti1Image(values, np.diag([1.0, 1.5, 2.0, 1.0]))
        image.header.set_data_dtype(np.int16)
        image.header.set_slope_inter(2.0, 0.0)
        nibabel.save(image, str(tmp_path / name))
        read = sitk.GetArrayFromImage(read_image(tmp_path / name))
        assert read.shape == (24, 22, 20) and float(read.max()) == 2.0 * values.max()
