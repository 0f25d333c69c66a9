"""``unet3d-segment batch`` / ``segment_cohort``: cases, results table, resume, cancel, and the Ray engine.

Small volumes and the tiny model of conftest.py; Ray runs once per module (``num_cpus=2``, no
dashboard, a small object store) for the two Ray tests.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CARD, save_tiny_model

from UNet3DSegmentLib.base.errors import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_OK, EXIT_SOME_FAILED
from UNet3DSegmentLib.base.options import BatchOptions, SegmentOptions
from UNet3DSegmentLib.cli.main import main
from UNet3DSegmentLib.engine.cases import discover_cases
from UNet3DSegmentLib.engine.progress import JsonLinesReporter

CLASSES = [c["name"] for c in TINY_CARD["classes"][1:]]


def _image(shape_zyx, spacing, origin, seed):
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.normal(100.0, 20.0, size=shape_zyx).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _write_folder(folder: Path, count: int = 3, shape=None) -> dict[str, object]:
    """NRRD, NIfTI and MHA cases on different grids, plus a corrupt file; returns the images by case."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    suffixes = [".nrrd", ".nii.gz", ".mha"]
    images = {}
    for index in range(count):
        size = shape or (18 + 2 * index, 20 + index, 22 - index)
        image = _image(size, (0.8 + 0.2 * index, 1.0, 1.5 + 0.5 * index), (float(index), -2.0, 3.5), index)
        name = f"case{index}"
        sitk.WriteImage(image, str(folder / f"{name}{suffixes[index % 3]}"))
        images[name] = image
    (folder / "corrupt.nii.gz").write_bytes(b"this is not a NIfTI file")
    return images


def _rows(outdir: Path) -> dict[str, dict]:
    with open(outdir / "results.csv", newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def _labels(path: Path):
    import SimpleITK as sitk

    return sitk.ReadImage(str(path))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("cohort") / "scans"
    return folder, _write_folder(folder)


def test_folder_cohort_rows_volumes_and_grids(cohort, tiny_model_path, tmp_path, monkeypatch) -> None:
    """Mixed formats on different grids + a corrupt file: exit 7, one row each, volumes = count x voxel."""
    import SimpleITK as sitk

    folder, images = cohort
    outdir = tmp_path / "out"
    stream = io.StringIO()
    monkeypatch.setattr("UNet3DSegmentLib.cli.main.make_reporter",
                        lambda mode: JsonLinesReporter(stream) if mode == "json" else None)
    code = main(["batch", str(folder), "-o", str(outdir), "--model", str(tiny_model_path), "--progress", "json"])
    assert code == EXIT_SOME_FAILED == 7
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert events[-1]["stage"] == "done" and events[-1]["output"] == str(outdir / "results.csv")
    assert {e["case"] for e in events if e["stage"] == "case"} == {"case0", "case1", "case2", "corrupt"}
    rows = _rows(outdir)
    assert list(rows) == ["case0", "case1", "case2", "corrupt"]
    assert rows["corrupt"]["status"] == "error" and "corrupt.nii.gz" in rows["corrupt"]["message"]
    assert "\n" not in rows["corrupt"]["message"] and rows["corrupt"]["output"] == ""
    header = list(rows["case0"])
    assert header[:6] == ["case", "status", "output", "seconds", "message", "warnings"]
    assert header[6:] == [f"{name} [mL]" for name in CLASSES] + ["confidence"]
    for name, image in images.items():
        row = rows[name]
        assert row["status"] == "ok" and row["output"] == str(outdir / f"{name}.seg.nrrd")
        labels = _labels(outdir / f"{name}.seg.nrrd")
        assert labels.GetSize() == image.GetSize()
        np.testing.assert_allclose(labels.GetSpacing(), image.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-6)
        array = sitk.GetArrayFromImage(labels)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        for value, cls in enumerate(CLASSES, start=1):
            assert float(row[f"{cls} [mL]"]) == pytest.approx(np.count_nonzero(array == value) * voxel_ml,
                                                              rel=1e-5, abs=1e-9)
        assert 0.25 <= float(row["confidence"]) <= 1.0  # 4 classes: the max probability is at least 1/4
    summary = json.loads((outdir / "summary.json").read_text())
    assert (summary["cases"], summary["ok"], summary["error"], summary["skipped"]) == (4, 3, 1, 0)
    assert summary["options"]["batch"]["engine"] == "local" and "unet3dsegment" in summary["versions"]
    assert set(summary["case_seconds"]) == {"case0", "case1", "case2", "corrupt"}

    # The same labelmap as `segment` writes for that file.
    single = tmp_path / "single.seg.nrrd"
    assert main(["segment", str(next(folder.glob("case1.*"))), "-o", str(single), "--model", str(tiny_model_path),
                 "--progress", "none"]) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(_labels(single)),
                                  sitk.GetArrayFromImage(_labels(outdir / "case1.seg.nrrd")))

    # Resume: every ok case is skipped and its output left alone; the failed one is tried again.
    stamps = {p.name: p.stat().st_mtime_ns for p in outdir.glob("*.seg.nrrd")}
    assert main(["batch", str(folder), "-o", str(outdir), "--model", str(tiny_model_path),
                 "--progress", "none"]) == EXIT_SOME_FAILED
    assert {p.name: p.stat().st_mtime_ns for p in outdir.glob("*.seg.nrrd")} == stamps
    again = _rows(outdir)
    assert [again[n]["status"] for n in images] == ["skipped"] * 3
    assert again["case0"]["CSF [mL]"] == rows["case0"]["CSF [mL]"]  # figures kept from the first run
    (folder / "corrupt.nii.gz").unlink()  # the bad file removed: now every case is done
    try:
        assert main(["batch", str(folder), "-o", str(outdir), "--model", str(tiny_model_path),
                     "--progress", "none"]) == EXIT_OK
        # --overwrite recomputes: outputs are rewritten and rows are ok again.
        assert main(["batch", str(folder), "-o", str(outdir), "--model", str(tiny_model_path), "--progress", "none",
                     "--overwrite", "--format", "nii.gz"]) == EXIT_OK
        assert {r["status"] for r in _rows(outdir).values()} == {"ok"}
        assert all((outdir / f"{n}.nii.gz").is_file() for n in images)
    finally:
        (folder / "corrupt.nii.gz").write_bytes(b"this is not a NIfTI file")


def test_csv_two_channels(tmp_path) -> None:
    """A CSV with a case column and one column per channel; a case whose channels differ in grid fails alone."""
    import SimpleITK as sitk

    from UNet3DSegmentLib.engine.cohort import segment_cohort

    card = json.loads(json.dumps(TINY_CARD))
    card["input"]["channels"] = ["T1", "FLAIR"]
    model = save_tiny_model(tmp_path / "model", card=card, name="two")
    data = tmp_path / "data"
    data.mkdir()
    lines = ["case,FLAIR,T1"]  # columns in another order than the card's: matched by name
    for index in range(2):
        t1 = _image((16, 18, 20), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), index)
        flair = _image((16, 18, 20), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), 10 + index)
        sitk.WriteImage(t1, str(data / f"s{index}_t1.nrrd"))
        sitk.WriteImage(flair, str(data / f"s{index}_flair.nii.gz"))
        lines.append(f"subject {index},s{index}_flair.nii.gz,{data / f's{index}_t1.nrrd'}")
    sitk.WriteImage(_image((16, 18, 21), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), 5), str(data / "bad_flair.nrrd"))
    lines.append("mismatch,bad_flair.nrrd,s0_t1.nrrd")
    table = data / "cases.csv"
    table.write_text("\n".join(lines) + "\n")
    cases = discover_cases(table, ["T1", "FLAIR"])
    assert [c.name for c in cases] == ["subject_0", "subject_1", "mismatch"]
    assert [p.name for p in cases[0].paths] == ["s0_t1.nrrd", "s0_flair.nii.gz"]  # card order: T1, FLAIR

    result = segment_cohort(table, tmp_path / "out", model=model, batch=BatchOptions(format="nrrd"))
    rows = {r["case"]: r for r in result.rows}
    assert rows["subject_0"]["status"] == rows["subject_1"]["status"] == "ok"
    assert rows["mismatch"]["status"] == "error" and "grid" in rows["mismatch"]["message"]
    assert not result.all_ok
    labels = _labels(tmp_path / "out" / "subject_1.nrrd")
    array = sitk.GetArrayFromImage(labels)
    written = _rows(tmp_path / "out")["subject_1"]
    for value, cls in enumerate(CLASSES, start=1):
        assert float(written[f"{cls} [mL]"]) == pytest.approx(np.count_nonzero(array == value) * 2.0 / 1000.0,
                                                              rel=1e-5, abs=1e-9)


def test_folder_groups_channels_and_dicom(tmp_path) -> None:
    """nnU-Net ``_0000``/``_0001`` files are one case; a DICOM series folder is one case."""
    for name in ("a_0001.nii.gz", "a_0000.nii.gz", "b.nrrd", "notes.txt", ".a.tmp-1-abcdef01.nrrd"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "1.dcm").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    cases = discover_cases(tmp_path, ["T1", "T2"])
    assert [(c.name, [p.name for p in c.paths]) for c in cases] == [
        ("a", ["a_0000.nii.gz", "a_0001.nii.gz"]), ("b", ["b.nrrd"]), ("ct", ["ct"])]


def test_cancel_mid_cohort_then_resume(tiny_model_path, tmp_path) -> None:
    """SIGTERM after the first case: exit 5, nothing half-written, the table lists what is done; resume finishes."""
    folder = tmp_path / "scans"
    _write_folder(folder, count=6, shape=(40, 40, 40))
    (folder / "corrupt.nii.gz").unlink()
    outdir = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "UNet3DSegmentLib", "batch", str(folder), "-o", str(outdir), "--model",
         str(tiny_model_path), "--progress", "json", "--overlap", "0.75", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    events = []
    for line in process.stdout:
        events.append(json.loads(line))
        if events[-1]["stage"] == "case" and events[-1]["status"] == "ok":
            process.send_signal(signal.SIGTERM)
            break
    rest, _ = process.communicate(timeout=120)
    events += [json.loads(line) for line in rest.splitlines()]
    assert process.returncode == EXIT_CANCELLED == 5
    assert events[-1]["stage"] == "error" and events[-1]["kind"] == "cancelled"
    rows = _rows(outdir)
    assert 1 <= len(rows) < 6 and {r["status"] for r in rows.values()} == {"ok"}
    written = sorted(p.name for p in outdir.iterdir() if p.name.endswith(".seg.nrrd"))
    assert written == sorted(f"{name}.seg.nrrd" for name in rows)  # an output for each row, none other
    assert not [p.name for p in outdir.iterdir() if p.name.startswith(".")]  # no temporaries left
    assert json.loads((outdir / "summary.json").read_text())["cancelled"] is True
    stamps = {p.name: p.stat().st_mtime_ns for p in outdir.glob("*.seg.nrrd")}

    assert main(["batch", str(folder), "-o", str(outdir), "--model", str(tiny_model_path), "--progress", "none",
                 "--overlap", "0.75", "--threads", "1"]) == EXIT_OK
    final = _rows(outdir)
    assert len(final) == 6 and all(final[n]["status"] == "skipped" for n in rows)
    assert all(final[n]["status"] == "ok" for n in final if n not in rows)
    assert all((outdir / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())


def test_ray_missing_is_one_line_exit_3(tiny_model_path, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    (tmp_path / "scans").mkdir()
    code = main(["batch", str(tmp_path / "scans"), "-o", str(tmp_path / "out"), "--engine", "ray",
                 "--model", str(tiny_model_path)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT == 3
    assert error == ["unet3d-segment: error: --engine ray needs Ray, which is not installed; "
                     "pip install 'unet3dsegment[ray]'"]


def test_options_travel_as_flags() -> None:
    from UNet3DSegmentLib.engine.case_worker import options_from_argv

    options = SegmentOptions(overlap=0.25, tta=True, batch_size=3, max_memory=2 ** 30, threads=1)
    assert options_from_argv(options.to_argv()) == options
    assert BatchOptions.spec("workers").cli_flag == "--workers"
    with pytest.raises(Exception, match="workers must be"):
        BatchOptions(workers=0)


# ------------------------------------------------------------------------------------------------ Ray
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2 ** 20, log_to_driver=False,
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join(
                 [str(Path(__file__).resolve().parents[1] / "UNet3DSegment"), str(Path(__file__).parent)])}})
    yield ray
    ray.shutdown()


def test_ray_two_workers_identical_to_local_and_survives_a_killed_actor(ray_session, cohort, tiny_model_path,
                                                                         tmp_path) -> None:
    """Two actors: the same labelmaps and table as the local engine; a worker killed (SIGKILL) while it
    holds a case gets that case retried once on another actor and the run finishes every case."""
    import SimpleITK as sitk

    from UNet3DSegmentLib.engine.cohort import segment_cohort

    folder, images = cohort
    local = segment_cohort(folder, tmp_path / "local", model=tiny_model_path)
    killed: list[int] = []

    def kill_second_dispatch(event: dict) -> None:
        if event["stage"] == "case" and event["status"] == "running" and event.get("worker") and \
                event["done"] >= 1 and not killed:
            killed.append(event["worker"])
            os.kill(event["worker"], signal.SIGKILL)

    ray = segment_cohort(folder, tmp_path / "ray", model=tiny_model_path,
                         batch=BatchOptions(engine="ray", workers=2), progress=kill_second_dispatch)
    assert killed and ray.summary["retries"] == 1
    assert [(r["case"], r["status"]) for r in ray.rows] == [(r["case"], r["status"]) for r in local.rows]
    assert [r["status"] for r in ray.rows] == ["ok", "ok", "ok", "error"]
    for name in images:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(_labels(tmp_path / "ray" / f"{name}.seg.nrrd")),
                                      sitk.GetArrayFromImage(_labels(tmp_path / "local" / f"{name}.seg.nrrd")))
    local_rows, ray_rows = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    for name in images:
        for column in [f"{c} [mL]" for c in CLASSES] + ["confidence"]:
            assert ray_rows[name][column] == local_rows[name][column]


def test_dicom_series_cases_to_dicom_seg(tiny_model_path, tmp_path) -> None:
    """``--format dicom-seg``: each DICOM series folder is a case written as <case>.dcm referencing its
    series; a NRRD case cannot be a DICOM SEG and fails alone."""
    pytest.importorskip("highdicom")
    import pydicom
    import SimpleITK as sitk

    from test_dicom_seg import phantom, write_series

    folder = tmp_path / "scans"
    uids = write_series(folder / "ct", "CT", phantom(1), rescale=(1, -1024))
    sitk.WriteImage(_image((12, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 3), str(folder / "plain.nrrd"))
    outdir = tmp_path / "out"
    assert main(["batch", str(folder), "-o", str(outdir), "--model", str(tiny_model_path), "--format", "dicom-seg",
                 "--progress", "none"]) == EXIT_SOME_FAILED
    rows = _rows(outdir)
    assert rows["ct"]["status"] == "ok" and rows["ct"]["output"] == str(outdir / "ct.dcm")
    assert rows["plain"]["status"] == "error" and "needs a DICOM series" in rows["plain"]["message"]
    seg = pydicom.dcmread(outdir / "ct.dcm")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(uids)
    assert not (outdir / "plain.dcm").exists()


# ---------------------------------------------------------------------------------- review fixes
def _touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def test_channel_suffixes_group_only_exactly_the_models_channels(tmp_path) -> None:
    """``_NNNN`` files are one case only when the suffixes are exactly 0000..n-1 for an n-channel
    model; a 1-channel model never groups; plain + suffixed files of one stem are refused; names
    that differ only in case are duplicates."""
    from UNet3DSegmentLib.base.errors import BadInputError

    folder = _touch(tmp_path / "a", "p_0000.nrrd", "p_0001.nrrd", "q_0000.nrrd", "q_0002.nrrd", "r_0000.nrrd")
    two = [(c.name, [p.name for p in c.paths]) for c in discover_cases(folder, ["T1", "T2"])]
    assert two == [("p", ["p_0000.nrrd", "p_0001.nrrd"]), ("q_0000", ["q_0000.nrrd"]),
                   ("q_0002", ["q_0002.nrrd"]), ("r_0000", ["r_0000.nrrd"])]
    one = [c.name for c in discover_cases(folder, ["T1"])]
    assert one == ["p_0000", "p_0001", "q_0000", "q_0002", "r_0000"]  # two patients never become one case
    both = _touch(tmp_path / "b", "s.nrrd", "s_0000.nrrd")
    with pytest.raises(BadInputError, match="both s.nrrd and s_0000.nrrd"):
        discover_cases(both, ["T1"])
    with pytest.raises(BadInputError, match="both named"):
        discover_cases(_touch(tmp_path / "c", "Case.nrrd", "case.mha"), ["T1"])


def test_csv_channel_columns_match_ignoring_case_or_are_refused(tmp_path) -> None:
    """Columns named after the channels in another case and order are matched by name; columns that
    do not name the channels are refused (never taken in file order)."""
    from UNet3DSegmentLib.base.errors import BadInputError

    table = tmp_path / "cases.csv"
    table.write_text("case,flair,t1\ns,f.nrrd,t.nrrd\n")
    assert [p.name for p in discover_cases(table, ["T1", "FLAIR"])[0].paths] == ["t.nrrd", "f.nrrd"]
    table.write_text("case,a,b\ns,f.nrrd,t.nrrd\n")
    with pytest.raises(BadInputError, match="channels are T1, FLAIR; name the columns case, T1, FLAIR"):
        discover_cases(table, ["T1", "FLAIR"])


def test_dying_worker_process_retries_the_running_cases_once(tmp_path, monkeypatch) -> None:
    """A worker process that dies breaks the pool: the running cases are retried once in a new pool;
    a case that kills its worker twice is an error row; every other case is ok."""
    from UNet3DSegmentLib.engine.cases import Case
    from UNet3DSegmentLib.engine import cohort
    from UNet3DSegmentLib.engine.cohort import _Book, _run_in_processes
    from UNet3DSegmentLib.engine.progress import ProgressEmitter

    import batch_fakes
    import threading

    monkeypatch.setattr(cohort, "_process_init", batch_fakes.init)  # spawned workers import batch_fakes
    monkeypatch.setattr(cohort, "_process_run", batch_fakes.run)

    cases = [Case(name, ()) for name in ("a", "die", "b")]
    book = _Book(cases, {}, tmp_path / "results.csv", [], ProgressEmitter(None), 2)
    _run_in_processes(cases, book, (str(tmp_path),), 2, threading.Event())
    rows = {r["case"]: r for r in book.ordered()}
    assert {n: r["status"] for n, r in rows.items()} == {"a": "ok", "die": "error", "b": "ok"}
    assert "died twice" in rows["die"]["message"] and book.retries >= 1
    # A case that kills its worker once (and nothing else breaks the pool at the same time) succeeds on retry.
    # (Run on its own: a case running beside "die" may lose its one retry to that worker's death.)
    flaky = [Case("flaky", ())]
    book = _Book(flaky, {}, tmp_path / "results2.csv", [], ProgressEmitter(None), 2)
    _run_in_processes(flaky, book, (str(tmp_path),), 2, threading.Event())
    assert [(r["case"], r["status"]) for r in book.ordered()] == [("flaky", "ok")] and book.retries == 1


def test_workers_with_a_bad_model_exit_4_before_starting_processes(tmp_path, capsys) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    import SimpleITK as sitk

    sitk.WriteImage(_image((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 0), str(folder / "a.nrrd"))
    model = tmp_path / "broken.keras"
    model.write_bytes(b"not a zip archive")
    code = main(["batch", str(folder), "-o", str(tmp_path / "out"), "--model", str(model), "--workers", "2",
                 "--progress", "none"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(error) == 1 and "broken.keras is not a readable .keras file" in error[0]


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("small") / "scans"
    _write_folder(folder, count=2, shape=(10, 12, 12))
    (folder / "corrupt.nii.gz").unlink()
    return folder


def _batch(folder: Path, outdir: Path, model: Path, *extra: str) -> int:
    return main(["batch", str(folder), "-o", str(outdir), "--model", str(model), "--progress", "none", *extra])


def test_resume_recomputes_a_case_whose_output_exists_without_an_ok_row(small_cohort, tiny_model_path,
                                                                        tmp_path) -> None:
    """An output whose row is not ok (failed, or lost when a crash came before the table was
    rewritten) is recomputed on resume, replacing its own output."""
    outdir = tmp_path / "out"
    assert _batch(small_cohort, outdir, tiny_model_path) == EXIT_OK
    table = (outdir / "results.csv").read_text().splitlines()
    lines = [table[0], table[1].replace(",ok,", ",error,", 1)]  # case0: error row; case1: row lost
    (outdir / "results.csv").write_text("\n".join(lines) + "\n")
    assert _batch(small_cohort, outdir, tiny_model_path) == EXIT_OK
    assert {n: r["status"] for n, r in _rows(outdir).items()} == {"case0": "ok", "case1": "ok"}


def test_resume_refuses_another_model_or_options(small_cohort, tiny_model_path, tmp_path, capsys) -> None:
    """Resume under other options is refused (one line, exit 3) unless --overwrite; an input newer than
    its output is recomputed."""
    outdir = tmp_path / "out"
    assert _batch(small_cohort, outdir, tiny_model_path) == EXIT_OK
    assert "fingerprint" in json.loads((outdir / "summary.json").read_text())
    capsys.readouterr()
    assert _batch(small_cohort, outdir, tiny_model_path, "--overlap", "0.25") == EXIT_BAD_INPUT
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "used another model or other options" in error[0] and "--overwrite" in error[0]
    assert {r["status"] for r in _rows(outdir).values()} == {"ok"}  # nothing touched
    later = (outdir / "case0.seg.nrrd").stat().st_mtime_ns + 10 ** 9
    path = next(small_cohort.glob("case1.*"))
    old = path.stat().st_mtime_ns
    os.utime(path, ns=(later, later))
    try:
        assert _batch(small_cohort, outdir, tiny_model_path) == EXIT_OK
        assert {n: r["status"] for n, r in _rows(outdir).items()} == {"case0": "skipped", "case1": "ok"}
    finally:
        os.utime(path, ns=(old, old))
    assert _batch(small_cohort, outdir, tiny_model_path, "--overlap", "0.25", "--overwrite") == EXIT_OK


def test_outdir_in_input_or_outputs_over_inputs_are_refused(tmp_path, tiny_model_path, capsys) -> None:
    import SimpleITK as sitk

    folder = tmp_path / "scans"
    folder.mkdir()
    sitk.WriteImage(_image((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 0), str(folder / "x.nrrd"))
    before = (folder / "x.nrrd").read_bytes()
    for outdir in (folder, folder / "out"):
        capsys.readouterr()
        assert _batch(folder, outdir, tiny_model_path) == EXIT_BAD_INPUT
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "inside it" in error[0]
    table = folder / "cases.csv"
    table.write_text("case,T1\nx,x.nrrd\n")
    assert _batch(table, folder, tiny_model_path, "--format", "nrrd", "--overwrite") == EXIT_BAD_INPUT
    assert "would replace an input" in capsys.readouterr().err
    assert (folder / "x.nrrd").read_bytes() == before and sorted(p.name for p in folder.iterdir()) == \
        ["cases.csv", "x.nrrd"]


def test_unusable_outdir_or_results_table_is_exit_3(small_cohort, tiny_model_path, tmp_path, capsys) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert _batch(small_cohort, a_file, tiny_model_path) == EXIT_BAD_INPUT
    assert "cannot create the output folder" in capsys.readouterr().err
    (tmp_path / "out" / "results.csv").mkdir(parents=True)
    assert _batch(small_cohort, tmp_path / "out", tiny_model_path) == EXIT_BAD_INPUT
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "cannot write" in error[0]


def test_input_check_warnings_reach_results_csv(small_cohort, tiny_model_path, tmp_path, monkeypatch) -> None:
    from UNet3DSegmentLib.engine import pipeline

    original = pipeline.segment_images

    def warned(*args, **kwargs):
        result = original(*args, **kwargs)
        result.warnings = ["background is not zero;\nskull-strip it", "second"]
        return result

    monkeypatch.setattr(pipeline, "segment_images", warned)
    assert _batch(small_cohort, tmp_path / "out", tiny_model_path) == EXIT_OK
    assert _rows(tmp_path / "out")["case0"]["warnings"] == "background is not zero; skull-strip it | second"


def test_results_table_is_rewritten_at_most_every_interval(tmp_path, monkeypatch) -> None:
    """A large cohort: results.csv is not rewritten after every case (quadratic), only every
    SAVE_INTERVAL_S and at the end."""
    from UNet3DSegmentLib.engine import cohort
    from UNet3DSegmentLib.engine.cases import Case
    from UNet3DSegmentLib.engine.progress import ProgressEmitter

    writes: list[int] = []
    original = cohort.write_results
    monkeypatch.setattr(cohort, "write_results", lambda path, rows, names: (writes.append(len(rows)),
                                                                            original(path, rows, names)))
    cases = [Case(f"c{i}", ()) for i in range(300)]
    book = cohort._Book(cases, {}, tmp_path / "results.csv", [], ProgressEmitter(None), 1)
    book.save()
    for case in cases:
        book.record({"case": case.name, "status": "ok", "output": "", "seconds": 0.0, "message": ""})
    assert book.done_count() == 300 and len(writes) <= 4
    book.save()
    assert writes[-1] == 300 and len(_rows(tmp_path)) == 300


def test_ray_start_keeps_the_sigterm_handler_and_gives_up_on_unplaceable_actors(tmp_path, monkeypatch) -> None:
    """ray.init replaces SIGTERM's handler: the command's is put back; actors that can never be placed
    end in one line naming the resources, not a hang."""
    import threading
    import types

    from UNet3DSegmentLib.base.errors import BadInputError
    from UNet3DSegmentLib.engine import ray_engine
    from UNet3DSegmentLib.engine.cases import Case

    seen: list = []

    class Ref:
        pass

    class Actor:
        def __init__(self):
            self.pid = types.SimpleNamespace(remote=lambda: Ref())

    class ActorClass:
        def options(self, **kwargs):
            seen.append(kwargs)
            return types.SimpleNamespace(remote=lambda *spec: Actor())

    def wait(refs, num_returns=1, timeout=None):
        seen.append(signal.getsignal(signal.SIGTERM))
        return [], list(refs)  # never placed

    def get(refs):
        if refs:
            raise AssertionError("ray.get of an actor that is never placed waits forever")
        return []

    errors = types.ModuleType("ray.exceptions")
    errors.GetTimeoutError = type("GetTimeoutError", (Exception,), {})
    errors.RayActorError = type("RayActorError", (Exception,), {})
    errors.RayTaskError = type("RayTaskError", (Exception,), {})
    fake = types.ModuleType("ray")
    fake.exceptions = errors
    fake.is_initialized = lambda: False
    fake.init = lambda **kwargs: signal.signal(signal.SIGTERM, signal.SIG_DFL)
    fake.remote = lambda cls: ActorClass()
    fake.wait, fake.get = wait, get
    fake.available_resources = lambda: {"CPU": 2.0}
    fake.kill = fake.shutdown = lambda *args: None
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.exceptions", errors)
    monkeypatch.setattr(ray_engine, "ACTOR_START_TIMEOUT_S", 0.3, raising=False)

    def handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        book = types.SimpleNamespace(start=lambda *a, **k: None, record=lambda *a, **k: None)
        with pytest.raises(BadInputError) as raised:
            ray_engine.run_on_ray([Case("a", ())], book, ("m",), BatchOptions(engine="ray", gpus_per_worker=1),
                                  threading.Event(), {})
        assert signal.getsignal(signal.SIGTERM) is handler
        assert handler in seen  # restored right after ray.init, while waiting too
    finally:
        signal.signal(signal.SIGTERM, previous)
    message = str(raised.value)
    assert "\n" not in message and "'GPU': 1" in message and "{'CPU': 2.0}" in message
