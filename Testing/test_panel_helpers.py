"""The Slicer panel's Qt-free helpers: progress text and time left, card texts, dependency checks, phantom."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CARD

from UNet3DSegmentLib.base.units import format_duration
from UNet3DSegmentLib.client import dependencies, panel_text, phantom
from UNet3DSegmentLib.base.errors import BadInputError
from UNet3DSegmentLib.engine.card import card_from_dict, default_card


def event(stage: str, done: int = 0, total: int = 0, seconds: float = 0.0, message: str = "") -> dict:
    return {"stage": stage, "done": done, "total": total, "seconds": seconds, "message": message}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (59.4, "59 s"), (60, "1 min"), (75, "1 min 15 s"), (3600, "1 h"), (3725, "1 h 2 min"), (-3, "0 s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_progress_runs_from_load_to_done_with_a_time_left_estimate() -> None:
    tracker = panel_text.ProgressTracker()
    assert tracker.view.percent == 0
    view = tracker.update(event("load", message="loading model"))
    assert view == panel_text.ProgressView(0, "Loading", "Loading: loading model")
    assert tracker.update(event("preprocess")).percent == 5
    # The first inference event only fixes the starting point: no rate yet.
    view = tracker.update(event("inference", 2, 40, seconds=10.0))
    assert view == panel_text.ProgressView(14, "2/40 patches", "Segmenting: 2/40 patches, estimating time left")
    # 10 more patches in 5 s: 0.5 s per patch, 28 patches left -> 14 s.
    view = tracker.update(event("inference", 12, 40, seconds=15.0))
    assert view.percent == 10 + int(82 * 12 / 40)
    assert view.status == "Segmenting: 12/40 patches, about 14 s left"
    view = tracker.update(event("inference", 40, 40, seconds=29.0))
    assert view.percent == 92 and view.status == "Segmenting: 40/40 patches, about 0 s left"
    assert tracker.update(event("postprocess")).percent == 92
    assert tracker.update(event("write", message="writing x")).percent == 96
    assert tracker.update(event("done")) == panel_text.ProgressView(100, "Importing the result",
                                                                       "Importing the result...")


def test_warnings_and_errors_keep_the_bar_and_change_the_status() -> None:
    tracker = panel_text.ProgressTracker()
    tracker.update(event("inference", 5, 10, seconds=1.0))
    assert tracker.update(event("warning", message="GPU out of memory; batch size 1")) == panel_text.ProgressView(
        51, "5/10 patches", "Warning: GPU out of memory; batch size 1")
    assert tracker.update(event("error", message="boom")).status == "Failed: boom"
    assert tracker.update({"stage": "something-new"}).status == "Failed: boom"


def test_card_texts_escape_html_and_list_segments_only() -> None:
    data = json.loads(json.dumps(TINY_CARD))
    data["classes"][2]["name"] = "Grey <matter> & more"
    data["description"] = "Uses <b>"
    card = card_from_dict(data)
    classes = panel_text.classes_html(card)
    assert "Background" not in classes
    assert classes.count("&#9632;") == 3
    assert "Grey &lt;matter&gt; &amp; more" in classes and "color:#4a90d9" in classes
    summary = panel_text.card_summary_html(card)
    assert summary.startswith("<b>tiny-test-model 0.0.1</b><br>Uses &lt;b&gt;<br><i>Tests only.</i>")
    assert "seed defaults assumed" in panel_text.card_summary_html(default_card(), from_file=False)


def test_channel_labels_follow_the_card() -> None:
    assert panel_text.channel_label(default_card(), 0) == "Input volume:"
    data = json.loads(json.dumps(TINY_CARD))
    data["input"]["channels"] = ["T1", "FLAIR"]
    card = card_from_dict(data)
    assert [panel_text.channel_label(card, i) for i in range(2)] == ["T1 volume:", "FLAIR volume:"]


def test_missing_modules_here_and_in_another_interpreter() -> None:
    assert dependencies.missing_modules(None, ["json", "no_such_module_xyz"]) == ["no_such_module_xyz"]
    assert dependencies.missing_modules(sys.executable, ["json", "no_such_module_xyz", "numpy"]) == [
        "no_such_module_xyz"
    ]


def test_missing_modules_with_a_bad_interpreter_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="not found; choose an existing interpreter"):
        dependencies.missing_modules(tmp_path / "python-nowhere")
    not_python = tmp_path / "not_python"
    not_python.write_text("#!/bin/sh\necho hello\n")
    not_python.chmod(0o755)
    with pytest.raises(BadInputError, match="is not a working Python"):
        dependencies.missing_modules(not_python)


def test_requirements_take_versions_from_the_requirements_file(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\ntensorflow>=2.16  # Keras 3\n")
    assert dependencies.requirements_for(["tensorflow", "SimpleITK"], requirements) == ["tensorflow>=2.16",
                                                                                       "SimpleITK"]
    assert dependencies.requirements_for(["tensorflow"]) == ["tensorflow"]


def test_constraints_pin_what_pip_installed_and_skip_the_rest() -> None:
    text = dependencies.constraints_text(["numpy", "no-such-distribution-xyz"])
    assert text == f"numpy=={np.__version__}\n"
    assert dependencies.constraints_text(["no-such-distribution-xyz"]) == ""


def test_install_command_quotes_specifiers() -> None:
    command = dependencies.install_command("/opt/conda/envs/tf/bin/python", ["tensorflow>=2.16", "SimpleITK"])
    assert command == '"/opt/conda/envs/tf/bin/python" -m pip install "tensorflow>=2.16" SimpleITK'


def test_phantom_has_tissue_in_t1_order_and_is_reproducible() -> None:
    t1, labels = phantom.brain_phantom((48, 56, 48), seed=1)
    assert t1.shape == labels.shape == (48, 56, 48) and t1.dtype == np.float32 and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    means = [float(t1[labels == k].mean()) for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]  # CSF < grey < white, as in T1
    assert float(np.abs(t1[labels == 0]).max()) == 0.0  # skull-stripped: zero outside
    again_t1, again_labels = phantom.brain_phantom((48, 56, 48), seed=1)
    np.testing.assert_array_equal(again_t1, t1)
    np.testing.assert_array_equal(again_labels, labels)


def test_dice() -> None:
    a = np.array([0, 1, 1, 2, 2, 2])
    b = np.array([0, 1, 2, 2, 2, 0])
    assert phantom.dice(a, b, 1) == pytest.approx(2 * 1 / 3)
    assert phantom.dice(a, b, 2) == pytest.approx(2 * 2 / 6)
    assert phantom.dice(a, b, 7) == 1.0


def test_engine_modules_follow_the_backend():
    assert dependencies.engine_modules() == ("tensorflow", "SimpleITK", "numpy")
    assert dependencies.engine_modules("torch") == ("keras", "torch", "SimpleITK", "numpy")
    assert dependencies.engine_modules("jax") == ("keras", "jax", "SimpleITK", "numpy")
    assert dependencies.requirements_for(["keras", "torch"]) == ["keras>=3.11", "torch"]
    with pytest.raises(BadInputError, match=r"^backend must be one of tensorflow, torch, jax, got 'caffe'$"):
        dependencies.engine_modules("caffe")


def test_phantom_score_and_the_self_tests_floors() -> None:
    _, reference = phantom.brain_phantom()
    assert phantom.score(reference, reference) == (1.0, [1.0, 1.0, 1.0])
    assert phantom.score_failures(1.0, [1.0, 1.0, 1.0], ["CSF", "GM", "WM"]) == []
    swapped = np.where(reference == 2, 3, np.where(reference == 3, 2, reference))  # grey and white matter swapped
    brain, classes = phantom.score(swapped, reference)
    assert brain == 1.0 and classes[0] == 1.0 and classes[1] < 0.5 and classes[2] < 0.5
    assert phantom.score_failures(brain, classes, ["CSF", "GM", "WM"]) == [
        f"GM Dice {classes[1]:.3f} < 0.5", f"WM Dice {classes[2]:.3f} < 0.5",
        f"mean class Dice {sum(classes) / 3:.3f} < 0.8"]


def test_log_gets_each_stage_and_each_tenth_of_the_patches_not_every_patch():
    from UNet3DSegmentLib.client.panel_text import ProgressTracker, log_line

    tracker, lines = ProgressTracker(), []
    events = [{"stage": "load", "message": "model"}] + [
        {"stage": "inference", "done": d, "total": 100, "seconds": float(d)} for d in range(1, 101)] + [
        {"stage": "postprocess"}, {"stage": "done"}]
    for event in events:
        previous = tracker.view
        line = log_line(previous, tracker.update(event), event)
        if line:
            lines.append(line)
    inference = [line for line in lines if line.startswith("Segmenting")]
    assert lines[0] == "Loading: model" and lines[-2:] == ["Building the labelmap...", "Importing the result..."]
    assert inference[0] == "Segmenting: 1/100 patches, estimating time left"
    assert 9 <= len(inference) <= 12  # about one per tenth, not 100


def test_segment_rows_take_the_engines_statistics_and_the_cards_colours():
    from UNet3DSegmentLib.client.panel_text import segment_rows
    from UNet3DSegmentLib.engine.card import card_from_dict

    card = card_from_dict(TINY_CARD)
    statistics = [{"label": 1, "name": "CSF", "voxels": 1234, "volume_ml": 1.2345},
                  {"label": 3, "name": "White matter", "voxels": 0, "volume_ml": 0.0}]
    assert segment_rows(statistics, card) == [("CSF", "#4a90d9", "1.23"), ("White matter", "#f5e6a0", "0.00")]


def test_torch_is_split_from_the_other_requirements():
    from UNet3DSegmentLib.client.install import split_torch

    assert split_torch(["keras>=3", "torch>=2.1"]) == (True, ["keras>=3"])
    assert split_torch(["tensorflow>=2.16", "torchvision"]) == (False, ["tensorflow>=2.16", "torchvision"])
