"""Per-class statistics (engine/statistics.py): figures against numpy, files, the pipeline and the done event."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import oblique_anisotropic_image
from UNet3DSegmentLib.base.errors import BadInputError
from UNet3DSegmentLib.cli.main import main
from UNet3DSegmentLib.engine import statistics as stats_module
from UNet3DSegmentLib.engine.card import card_from_dict, default_card
from UNet3DSegmentLib.engine.statistics import (
    compute_statistics,
    read_statistics,
    statistics_columns,
    write_statistics,
)
from conftest import TINY_CARD


def _random_case(seed: int = 0, shape=(9, 11, 13), classes: int = 4):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=shape).astype(np.uint8)
    t1 = rng.normal(300.0, 40.0, size=shape).astype(np.float32)
    t2 = rng.normal(-5.0, 2.0, size=shape).astype(np.float64)
    probabilities = rng.random(shape + (classes,)).astype(np.float32)
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    return labels, [t1, t2], probabilities


def _two_channel_card(classes: int = 4):
    data = json.loads(json.dumps(TINY_CARD))
    data["input"]["channels"] = ["T1", "T2"]
    return card_from_dict(data)


def test_figures_equal_numpy_on_each_class_mask():
    labels, images, probabilities = _random_case()
    card = _two_channel_card()
    spacing = (0.8, 1.1, 2.5)
    rows = compute_statistics(labels, spacing, card, images=images, probabilities=probabilities)
    assert [r["label"] for r in rows] == [1, 2, 3]
    assert [r["name"] for r in rows] == ["CSF", "Grey matter", "White matter"]
    assert statistics_columns(rows) == ["label", "name", "voxels", "volume_ml", "mean_T1", "std_T1",
                                        "mean_T2", "std_T2", "confidence"]
    for row in rows:
        mask = labels == row["label"]
        assert row["voxels"] == int(mask.sum())
        assert row["volume_ml"] == pytest.approx(mask.sum() * 0.8 * 1.1 * 2.5 / 1000.0, rel=1e-12)
        for name, image in zip(("T1", "T2"), images):
            assert row[f"mean_{name}"] == pytest.approx(float(image[mask].astype(np.float64).mean()), rel=1e-9)
            assert row[f"std_{name}"] == pytest.approx(float(image[mask].astype(np.float64).std()), rel=1e-9)
        assert row["confidence"] == pytest.approx(float(probabilities[..., row["label"]][mask].mean()), rel=1e-6)


def test_classes_first_layout_slabs_empty_classes_and_foreign_labels(monkeypatch):
    labels, images, probabilities = _random_case(seed=1)
    card = _two_channel_card()
    whole = compute_statistics(labels, (1, 1, 1), card, images=images, probabilities=probabilities)
    monkeypatch.setattr(stats_module, "SLAB_VOXELS", 50)  # several slabs of a few slices
    sliced = compute_statistics(labels, (1, 1, 1), card, images=images,
                                probabilities=np.moveaxis(probabilities, -1, 0))  # (k, z, y, x)
    for a, b in zip(whole, sliced):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == (b[key] if key == "name" else pytest.approx(b[key], rel=1e-9))

    labels = np.zeros((4, 5, 6), dtype=np.uint8)
    labels[0, 0, :3] = 2
    labels[1, 1, 1] = 9  # not a class of the card: counted nowhere
    rows = compute_statistics(labels, (2, 2, 2), card, images=[np.ones(labels.shape)] * 2)
    assert [r["voxels"] for r in rows] == [0, 3, 0]
    assert rows[0]["mean_T1"] is None and rows[0]["std_T1"] is None and rows[0]["volume_ml"] == 0.0
    assert rows[1]["volume_ml"] == pytest.approx(3 * 8 / 1000.0)
    assert "confidence" not in rows[1]


def test_non_finite_voxels_are_left_out_without_numpy_warnings():
    labels, images, _ = _random_case(seed=3)
    t1 = images[0].copy()
    t1[0, 0, :4] = [np.nan, np.inf, -np.inf, np.nan]
    with np.errstate(all="raise"):  # no floating-point warning on the way (stderr stays clean)
        rows = compute_statistics(labels, (1, 1, 1), _two_channel_card(), images=[t1, images[1]])
    finite = np.isfinite(t1)
    for row in rows:
        mask = (labels == row["label"]) & finite
        assert row["voxels"] == int((labels == row["label"]).sum())
        assert row["mean_T1"] == pytest.approx(float(t1[mask].astype(np.float64).mean()), rel=1e-9)
        assert row["std_T1"] == pytest.approx(float(t1[mask].astype(np.float64).std()), rel=1e-9)
    only_nan = np.full(labels.shape, np.nan, dtype=np.float32)
    rows = compute_statistics(labels, (1, 1, 1), _two_channel_card(), images=[only_nan, images[1]])
    assert all(r["mean_T1"] is None and r["std_T1"] is None and r["mean_T2"] is not None for r in rows)


def test_bad_shapes_are_refused():
    card = default_card(num_classes=3)
    with pytest.raises(BadInputError, match="do not match the labelmap"):
        compute_statistics(np.zeros((2, 3, 4), np.uint8), (1, 1, 1), card, probabilities=np.zeros((2, 3, 4, 5)))
    with pytest.raises(BadInputError, match="does not match the labelmap"):
        compute_statistics(np.zeros((2, 3, 4), np.uint8), (1, 1, 1), card, images=[np.zeros((2, 3, 5))])
    with pytest.raises(BadInputError, match="positive voxel spacings"):
        compute_statistics(np.zeros((2, 3, 4), np.uint8), (1, 0, 1), card)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_files_are_written_atomically_and_read_back(tmp_path: Path, suffix: str):
    labels, images, probabilities = _random_case(seed=2)
    rows = compute_statistics(labels, (0.7, 0.7, 1.2), _two_channel_card(), images=images,
                              probabilities=probabilities)
    rows[1]["mean_T1"] = None  # an empty figure survives the round trip
    path = tmp_path / f"figures{suffix}"
    assert write_statistics(rows, path) == path.absolute()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    assert read_statistics(path) == rows  # floats exactly (repr in CSV)
    with pytest.raises(BadInputError, match="exists; pass --overwrite"):
        write_statistics(rows, path)
    write_statistics(rows[:1], path, overwrite=True)
    assert read_statistics(path) == rows[:1]
    with pytest.raises(BadInputError, match=r"\.csv or \.json"):
        write_statistics(rows, tmp_path / "figures.txt")


# --------------------------------------------------------------------------------------------------
# The pipeline: --statistics, the done event


@pytest.fixture(scope="module")
def oblique_nrrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "oblique.nrrd"
    image = oblique_anisotropic_image()
    array = sitk.GetArrayFromImage(image)
    z, y, x = np.mgrid[0:array.shape[0], 0:array.shape[1], 0:array.shape[2]]
    smooth = sitk.GetImageFromArray((60 + 4 * x - 3 * y + 2 * z + 0.1 * array).astype(np.float32))
    smooth.CopyInformation(image)  # varied labels from the random tiny model, oblique anisotropic geometry
    sitk.WriteImage(smooth, str(path))
    return path


class _Stream:
    """What ``--progress json`` writes, caught in memory (the reporter's stream is bound at import)."""

    def __init__(self, monkeypatch) -> None:
        from UNet3DSegmentLib.engine.progress import JsonLinesReporter

        self.buffer = io.StringIO()
        monkeypatch.setattr("UNet3DSegmentLib.cli.main.make_reporter",
                            lambda mode: JsonLinesReporter(self.buffer) if mode == "json" else None)
        self.out = ""

    def readouterr(self) -> "_Stream":
        self.out = self.buffer.getvalue()
        self.buffer.seek(0)
        self.buffer.truncate()
        return self


@pytest.fixture
def events_out(monkeypatch) -> _Stream:
    return _Stream(monkeypatch)


def _json_events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_segment_statistics_match_the_written_labelmap_and_the_done_event(
        tmp_path: Path, oblique_nrrd: Path, tiny_model_path: Path, events_out, suffix: str):
    output, figures, probs = tmp_path / "labels.nrrd", tmp_path / f"figures{suffix}", tmp_path / "probs.nrrd"
    code = main(["segment", str(oblique_nrrd), "-o", str(output), "--model", str(tiny_model_path),
                 "--statistics", str(figures), "--probabilities", str(probs), "--progress", "json",
                 "--precision", "fp32", "--overlap", "0.25"])
    assert code == 0
    events = _json_events(events_out.readouterr().out)
    done = events[-1]
    assert done["stage"] == "done" and done["statistics_file"] == str(figures)
    rows = read_statistics(figures)
    assert rows == done["statistics"]  # one implementation: the file and the event agree exactly

    labels = sitk.ReadImage(str(output))
    label_array = sitk.GetArrayFromImage(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(oblique_nrrd))).astype(np.float64)
    probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(probs)))  # (z, y, x, k) vector image
    assert [r["name"] for r in rows] == ["CSF", "Grey matter", "White matter"]
    assert sum(r["voxels"] for r in rows) > 0
    for row in rows:
        mask = label_array == row["label"]
        assert row["voxels"] == int(mask.sum())
        assert row["volume_ml"] == pytest.approx(mask.sum() * voxel_ml, rel=1e-9)
        if mask.any():
            assert row["mean_T1"] == pytest.approx(image[mask].mean(), rel=1e-6)
            assert row["std_T1"] == pytest.approx(image[mask].std(), rel=1e-6)
            assert row["confidence"] == pytest.approx(float(probabilities[..., row["label"]][mask].mean()), rel=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([output.name, figures.name, probs.name])


def test_confidence_without_full_probabilities(tmp_path: Path, oblique_nrrd: Path, tiny_model_path: Path, events_out):
    """The slab-by-slab path (no --probabilities) reports the same confidence, to float16 precision."""
    runs = []
    for keep in (False, True):
        folder = tmp_path / str(keep)
        folder.mkdir()
        argv = ["segment", str(oblique_nrrd), "-o", str(folder / "l.nrrd"), "--model", str(tiny_model_path),
                "--progress", "json", "--precision", "fp32", "--overlap", "0.25"]
        if keep:
            argv += ["--probabilities", str(folder / "p.nrrd")]
        assert main(argv) == 0
        runs.append(_json_events(events_out.readouterr().out)[-1]["statistics"])
    slabs, full = runs
    for a, b in zip(slabs, full):
        assert a["voxels"] == b["voxels"]
        if a["voxels"]:
            assert a["mean_T1"] == pytest.approx(b["mean_T1"], rel=1e-9)
            assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-3)
    assert sum(a["voxels"] > 0 for a in slabs) >= 1


def test_statistics_path_is_checked_before_the_run(tmp_path: Path, oblique_nrrd: Path, tiny_model_path: Path,
                                                   events_out):
    base = ["segment", str(oblique_nrrd), "-o", str(tmp_path / "l.nrrd"), "--model", str(tiny_model_path),
            "--progress", "json"]
    assert main(base + ["--statistics", str(tmp_path / "figures.txt")]) != 0
    error = _json_events(events_out.readouterr().out)[-1]
    assert error["stage"] == "error" and "must end in .csv or .json" in error["message"]
    (tmp_path / "old.csv").write_text("keep me")
    assert main(base + ["--statistics", str(tmp_path / "old.csv")]) != 0
    assert "exists; pass --overwrite" in _json_events(events_out.readouterr().out)[-1]["message"]
    assert (tmp_path / "old.csv").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv"]  # nothing written, no labelmap either


# --------------------------------------------------------------------------------------------------
# The web page's segment list: the engine's figures, not its own count


class _State(dict):
    """What the web app uses of trame's state: keys as attributes, ``update``."""

    __getattr__ = dict.__getitem__
    __setattr__ = dict.__setitem__


class _Segment:
    def __init__(self, name: str) -> None:
        self.name = name

    def GetName(self) -> str:  # noqa: N802 - the MRML API
        return self.name

    def GetColor(self) -> tuple:  # noqa: N802
        return (0.5, 0.25, 1.0)


class _Segmentation:
    def __init__(self, names: list[str]) -> None:
        self.segments = {f"s{i}": _Segment(n) for i, n in enumerate(names)}

    def GetNumberOfSegments(self) -> int:  # noqa: N802
        return len(self.segments)

    def GetNthSegmentID(self, index: int) -> str:  # noqa: N802
        return list(self.segments)[index]

    def GetSegment(self, segment_id: str) -> _Segment:  # noqa: N802
        return self.segments[segment_id]


class _Node:
    def __init__(self, names: list[str]) -> None:
        self.segmentation = _Segmentation(names)

    def GetSegmentation(self) -> _Segmentation:  # noqa: N802
        return self.segmentation

    def GetDisplayNode(self) -> None:  # noqa: N802
        return None


def test_web_page_lists_the_volumes_of_the_done_event():
    pytest.importorskip("trame_slicer")
    import types

    from UNet3DSegmentLib.web.app import UNet3DSegmentWebApp

    state = _State(segments=[])
    node = _Node(["CSF", "Grey matter"])
    page = types.SimpleNamespace(state=state, segmentation=node, _warnings=["channel T1: background is not zero"],
                                 _statistics={"CSF": {"name": "CSF", "volume_ml": 152.34, "confidence": 0.9},
                                              "Grey matter": {"name": "Grey matter", "volume_ml": 0.0,
                                                              "confidence": None}})
    page._report = lambda info="", error="": state.update(info_message=info, error_message=error)
    page._show_result = lambda shown: UNet3DSegmentWebApp._refresh_segments(page)
    UNet3DSegmentWebApp._finish(page, types.SimpleNamespace(error=None, segmentationNode=node))
    assert [(s["name"], s["volume_ml"], s["volume_text"]) for s in state.segments] == [
        ("CSF", 152.34, "152.3 mL"), ("Grey matter", 0.0, "0.0 mL")]
    assert state.info_message == ("Done: CSF 152.3 mL, Grey matter 0.0 mL. "
                                  "Warning: channel T1: background is not zero")
