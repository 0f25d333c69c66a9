"""Input checks (engine/input_checks.py) against the card's ``input.expect``: warnings, never refusals.

Built from nilearn's MNI152 template (the data the demo model was trained on): the clean template
passes; with 3 % noise outside the brain it passes too (the card's input.background clears it), with 25 %
noise it is "background is not zero"; wrapped in skull and scalp it
is "looks not skull-stripped"; with a lost header it is "orientation may be lost" / "header looks lost".
"""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TINY_CARD, save_tiny_model
from UNet3DSegmentLib.base.errors import BadModelError
from UNet3DSegmentLib.engine.card import InputExpectation, card_from_dict, default_card, load_card
from UNet3DSegmentLib.engine.input_checks import check_channel, check_geometry, check_images, check_input

ROOT = Path(__file__).resolve().parent.parent
DEMO_CARD = ROOT / "Resources" / "Models" / "brain_tissue_demo.json"
BACKGROUND = "background is not zero"
SKULL = "looks not skull-stripped"


@pytest.fixture(scope="module")
def demo_card():
    return load_card(DEMO_CARD)


@pytest.fixture(scope="module")
def template() -> sitk.Image:
    pytest.importorskip("nilearn")
    from UNet3DSegmentLib.training.demo import mni152_paths

    return sitk.Cast(sitk.ReadImage(str(mni152_paths()["t1"])), sitk.sitkFloat32)


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.CopyInformation(reference)
    return image


def _noisy_background(template: sitk.Image, level: float = 0.03, seed: int = 0) -> sitk.Image:
    """The skull-stripped template with |noise| of ``level`` x its maximum outside the brain."""
    array = sitk.GetArrayFromImage(template)
    outside = array == 0
    rng = np.random.default_rng(seed)
    array[outside] = np.abs(rng.normal(0.0, level * array.max(), outside.sum()))
    return _like(array, template)


def _grow(mask: np.ndarray, voxels: int) -> np.ndarray:
    """``mask`` dilated by ``voxels`` (6-neighbourhood steps), numpy only."""
    grown = mask.copy()
    for _ in range(voxels):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        step[:, :, 1:] |= grown[:, :, :-1]
        step[:, :, :-1] |= grown[:, :, 1:]
        grown = step
    return grown


def _head(template: sitk.Image, seed: int = 0) -> sitk.Image:
    """The template in a 6 mm skull (dark bone, brighter marrow) and a bright 7 mm scalp (fat), noisy air: a head.

    The template's brain reaches its lowest slice, so this head has no neck: a small head (about 2.9 L).
    """
    array = sitk.GetArrayFromImage(template)
    brain = array > 0
    median = float(np.median(array[brain]))
    skull = _grow(brain, 6)
    head = _grow(skull, 7)
    rng = np.random.default_rng(seed)
    array[skull & ~brain] = 0.3 * median + rng.normal(0, 0.05 * median, (skull & ~brain).sum())
    array[head & ~skull] = 1.1 * median + rng.normal(0, 0.05 * median, (head & ~skull).sum())
    array[~head] = np.abs(rng.normal(0, 0.02 * median, (~head).sum()))
    return _like(array, template)


def _names(warnings: list[str]) -> list[str]:
    found = []
    for text in warnings:
        for name in (BACKGROUND, SKULL, "orientation may be lost", "header looks lost", "is outside the",
                     "direction matrix is not a rotation", "intensities unlike", "is far from the"):
            if name in text:
                found.append(name)
    return found


# --------------------------------------------------------------------------------------------------
# The bundled card on the template and its broken variants


def test_clean_template_gets_no_warning(template, demo_card):
    assert check_images([template], demo_card) == []


def test_held_out_training_copy_gets_no_warning(template, demo_card):
    """A randomly transformed copy (bias, gamma, scale, noise inside the brain) still fits the bounds."""
    from UNet3DSegmentLib.training.demo import load_template_maps, transformed_copy

    t1, gm, wm = load_template_maps()
    image, _ = transformed_copy(t1, gm, wm, 9001)
    assert check_images([image], demo_card) == []


def test_slicer_self_test_phantom_gets_no_content_warning(demo_card):
    """The self-test's synthetic brain (small, 1 mm) fits the bundled card; only a default header is named."""
    from UNet3DSegmentLib.client.phantom import brain_phantom

    t1, _ = brain_phantom()
    assert check_input([t1], (1.0, 1.0, 1.0), np.eye(3).ravel(), demo_card, origin=(-48.0, -56.0, -48.0)) == []
    warnings = check_input([t1], (1.0, 1.0, 1.0), np.eye(3).ravel(), demo_card, origin=(0.0, 0.0, 0.0))
    assert _names(warnings) == ["header looks lost"], warnings


def test_background_noise_the_engine_clears_is_not_named(template, demo_card):
    """3 % noise outside the brain lies below the card's background level (input.background): the engine
    sets it to 0 before the crop and the z-score, so it is no reason to warn (see test_demo.py for the
    segmentation itself)."""
    assert demo_card.input.background is not None and demo_card.input.background.below == 0.1
    assert check_images([_noisy_background(template)], demo_card) == []


def test_noisy_background_is_named_with_its_remedy(template, demo_card):
    """Background noise far above the level the card clears (50 % of the maximum) is still named."""
    warnings = check_images([_noisy_background(template, level=0.5)], demo_card)
    assert _names(warnings)[0] == BACKGROUND, warnings
    assert re.match(r"channel T1: background is not zero: only \d+\.\d% of the voxels are 0 or below [\d.]+ "
                    r"\(10% of the 99th percentile, cleared as background\)", warnings[0]), warnings[0]
    assert "brain-tissue-demo" in warnings[0] and "multiply by a brain mask" in warnings[0]
    # A card that clears nothing counts exact zeros only: the 3 % noise is named there.
    plain = copy.deepcopy(json.loads(DEMO_CARD.read_text()))
    del plain["input"]["background"]
    warnings = check_images([_noisy_background(template)], card_from_dict(plain))
    assert _names(warnings) == [BACKGROUND], warnings
    assert warnings[0].startswith("channel T1: background is not zero: only 0.0% of the voxels are exactly 0")


def test_head_not_skull_stripped_is_named_with_its_remedy(template, demo_card):
    warnings = check_images([_head(template)], demo_card)
    assert _names(warnings) == [SKULL], warnings  # its noisy air lies below the background level the card clears
    skull = warnings[0]
    assert skull.startswith("channel T1: looks not skull-stripped: its foreground covers ")
    assert "more than the 2400 mL of a brain alone" in skull and "Skull-strip it first" in skull
    # A head whose air was zeroed by the scanner: only the skull warning.
    array = sitk.GetArrayFromImage(_head(template))
    array[array < 0.05 * array.max()] = 0
    assert _names(check_images([_like(array, template)], demo_card)) == [SKULL]


def test_downsampled_template_warns_about_spacing_only(template, demo_card):
    """4 mm voxels (the web page's fast demo): outside the 0.75-1.5 mm the demo model expects."""
    small = sitk.BinShrink(template, [4, 4, 4])
    warnings = check_images([small], demo_card)
    assert _names(warnings) == ["is outside the"], warnings
    assert warnings[0].startswith("spacing 4 x 4 x 4 mm is outside the 0.75-1.5 mm model brain-tissue-demo expects")


def test_mask_given_as_input_has_unlike_intensities(template, demo_card):
    mask = sitk.Cast(template > 0, sitk.sitkFloat32) * 100.0
    warnings = check_images([mask], demo_card)
    assert _names(warnings) == ["intensities unlike"], warnings
    assert ("percentile 1 of the foreground is 1.00 x its median (expected 0.05-0.9), percentile 99 is 1.00 x "
            "(expected 1.1-2)") in warnings[0]


def test_lost_header_orientation_warnings(template, demo_card):
    array = sitk.GetArrayViewFromImage(template)
    # A sagittal scan whose direction was dropped: identity direction, thick slices.
    warnings = check_input([array], (0.9, 0.9, 1.0 * 3), np.eye(3).ravel(), demo_card, origin=(10.0, 5.0, 0.0))
    assert "orientation may be lost" in _names(warnings)
    assert warnings[0].startswith("orientation may be lost: identity direction with anisotropic spacing "
                                  "0.9 x 0.9 x 3 mm")
    # Everything at its default: spacing 1, origin 0, identity (NIfTI written with an identity affine).
    warnings = check_input([array], (1.0, 1.0, 1.0), np.diag([-1.0, -1.0, 1.0]).ravel(), demo_card,
                           origin=(0.0, 0.0, 0.0))
    assert _names(warnings) == ["header looks lost"], warnings
    # A damaged (sheared) direction matrix, even for a card without expectations.
    sheared = np.array([[1.0, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    warnings = check_geometry((1.0, 1.0, 1.0), sheared.ravel(), default_card(), origin=(3.0, 0.0, 0.0))
    assert _names(warnings) == ["direction matrix is not a rotation"], warnings
    # The template's own header: nothing.
    assert check_geometry(template.GetSpacing(), template.GetDirection(), demo_card, template.GetOrigin()) == []


def test_spacing_far_from_the_cards_resampling_target():
    data = copy.deepcopy(TINY_CARD)
    data["input"]["spacing"] = [1.0, 1.0, 1.0]
    card = card_from_dict(data)
    rotation = sitk.VersorTransform((0, 0, 1), 0.3).GetMatrix()
    assert check_geometry((1.2, 0.9, 3.0), rotation, card) == []
    warnings = check_geometry((0.1, 0.1, 0.1), rotation, card)  # cm read as mm, say
    assert _names(warnings) == ["is far from the"], warnings


def test_cards_without_expect_check_only_the_geometry(template):
    card = default_card()
    assert card.input.expect is None
    assert check_channel(sitk.GetArrayViewFromImage(_noisy_background(template)), (1, 1, 1), card, "image") == []


# --------------------------------------------------------------------------------------------------
# The card's expect section


def test_bundled_card_declares_what_the_demo_expects(demo_card):
    expect = demo_card.input.expect
    assert isinstance(expect, InputExpectation)
    assert expect.skull_stripped and expect.background_zero and expect.modality == "T1-weighted MRI"
    assert expect.foreground_ml == (300.0, 2400.0) and expect.spacing == (0.75, 1.5)
    assert expect.relative_percentiles == ((1.0, 0.05, 0.9), (99.0, 1.1, 2.0))
    assert card_from_dict(demo_card.to_dict()) == demo_card  # round trip
    assert "expect" not in default_card().to_dict()["input"]  # cards without it keep their form


def _card_with_expect(expect) -> dict:
    data = copy.deepcopy(TINY_CARD)
    data["input"]["expect"] = expect
    return data


@pytest.mark.parametrize("expect, field, problem", [
    ([], "input.expect", "must be a JSON object"),
    ({"skullstripped": True}, "input.expect.skullstripped", "did you mean 'skull_stripped'?"),
    ({"skull_stripped": "yes"}, "input.expect.skull_stripped", "must be true or false"),
    ({"background_zero": 1}, "input.expect.background_zero", "must be true or false"),
    ({"min_zero_fraction": 1.5}, "input.expect.min_zero_fraction", "must be >= 0 and < 1"),
    ({"min_zero_fraction": "0.2"}, "input.expect.min_zero_fraction", "must be a finite number"),
    ({"modality": 3}, "input.expect.modality", "must be a string"),
    ({"foreground_ml": [2000, 700]}, "input.expect.foreground_ml", "min <= max"),
    ({"foreground_ml": [700]}, "input.expect.foreground_ml", "must be [min, max] in mL"),
    ({"spacing": [0, 1.5]}, "input.expect.spacing", "two positive numbers"),
    ({"relative_percentiles": [1, 99]}, "input.expect.relative_percentiles", "must be a JSON object"),
    ({"relative_percentiles": {"p1": [0, 1]}}, "input.expect.relative_percentiles.p1", "is not a percentile"),
    ({"relative_percentiles": {"101": [0, 1]}}, "input.expect.relative_percentiles.101", "is not a percentile"),
    ({"relative_percentiles": {"1": [0.9, 0.1]}}, "input.expect.relative_percentiles.1", "min <= max"),
    ({"relative_percentiles": {"1": [-1, 0.5]}}, "input.expect.relative_percentiles.1", "non-negative"),
    ({"intensity_percentiles": {"50": [0, None]}}, "input.expect.intensity_percentiles.50", "must be [min, max]"),
])
def test_bad_expect_values_are_named(expect, field, problem):
    with pytest.raises(BadModelError) as caught:
        card_from_dict(_card_with_expect(expect), source="bad.json")
    message = str(caught.value)
    assert message.startswith(f"model card bad.json: {field} ") and problem in message, message
    assert "\n" not in message


def test_absolute_percentiles_for_ct_like_channels():
    card = card_from_dict(_card_with_expect({"intensity_percentiles": {"50": [-200, 200]}}))
    assert card.input.expect.intensity_percentiles == ((50.0, -200.0, 200.0),)
    hu = np.full((10, 10, 10), 40.0)
    assert check_channel(hu, (1, 1, 1), card, "CT") == []
    warnings = check_channel(hu / 1000.0 + 1000.0, (1, 1, 1), card, "CT")  # a rescale slope went missing
    assert warnings == ["channel CT: intensities unlike the model's input: percentile 50 is 1000 (expected -200 "
                        "to 200) for model tiny-test-model: check the modality and the intensity units (e.g. CT in "
                        "Hounsfield units, a missing rescale slope)"]


# --------------------------------------------------------------------------------------------------
# The pipeline: warning events before inference, the run goes on


@pytest.fixture(scope="module")
def expecting_model(tmp_path_factory) -> Path:
    data = _card_with_expect({"modality": "test MRI", "background_zero": True, "min_zero_fraction": 0.3})
    return save_tiny_model(tmp_path_factory.mktemp("expecting"), card=data, name="expecting")


def _ball(noisy: bool) -> sitk.Image:
    z, y, x = np.mgrid[0:20, 0:24, 0:28]
    inside = (z - 10) ** 2 + (y - 12) ** 2 + (x - 14) ** 2 < 8 ** 2
    array = np.where(inside, 100.0 + x, 0.0)
    if noisy:
        array = array + np.abs(np.random.default_rng(0).normal(0, 3.0, array.shape)) * ~inside
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((1.0, 1.0, 1.2))
    image.SetOrigin((-10.0, 4.0, 2.0))
    return image


def test_pipeline_emits_input_warnings_and_still_segments(tmp_path: Path, expecting_model: Path, monkeypatch):
    from UNet3DSegmentLib.cli.main import main
    from UNet3DSegmentLib.engine.progress import JsonLinesReporter

    stream = io.StringIO()
    monkeypatch.setattr("UNet3DSegmentLib.cli.main.make_reporter",
                        lambda mode: JsonLinesReporter(stream) if mode == "json" else None)
    runs = {}
    for noisy in (False, True):
        source = tmp_path / f"ball_{noisy}.nrrd"
        sitk.WriteImage(_ball(noisy), str(source))
        output = tmp_path / f"labels_{noisy}.nrrd"
        assert main(["segment", str(source), "-o", str(output), "--model", str(expecting_model),
                     "--progress", "json"]) == 0
        assert output.exists()  # a warning never refuses
        runs[noisy] = [json.loads(line) for line in stream.getvalue().splitlines()]
        stream.seek(0)
        stream.truncate()
    assert [e for e in runs[False] if e["stage"] == "warning"] == [] and runs[False][-1]["warnings"] == []
    events = runs[True]
    warnings = [e for e in events if e["stage"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["check"] == "input"
    assert warnings[0]["message"].startswith("channel T1: background is not zero")
    stages = [e["stage"] for e in events]
    assert stages.index("warning") < stages.index("preprocess") < stages.index("inference")
    assert events[-1]["stage"] == "done" and events[-1]["warnings"] == [warnings[0]["message"]]


def test_terminal_shows_the_warning_line(tmp_path: Path, expecting_model: Path, monkeypatch):
    """``--progress bar``: the warning is a ``warning: ...`` line of the terminal display (stderr)."""
    from UNet3DSegmentLib.cli.main import main
    from UNet3DSegmentLib.cli.terminal import BarReporter

    stream = io.StringIO()  # the bar's stream (sys.stderr) is bound when the module is imported
    monkeypatch.setattr("UNet3DSegmentLib.cli.main.make_reporter",
                        lambda mode: BarReporter(stream) if mode == "bar" else None)
    source = tmp_path / "ball.nrrd"
    sitk.WriteImage(_ball(True), str(source))
    assert main(["segment", str(source), "-o", str(tmp_path / "labels.nrrd"), "--model", str(expecting_model),
                 "--progress", "bar"]) == 0
    assert "\nwarning: channel T1: background is not zero: only 0.0% of the voxels are exactly 0" in stream.getvalue()


def test_sampled_foreground_volume_is_exact_when_the_shape_is_not_a_multiple_of_the_stride(monkeypatch):
    """A thin, wide volume: the sampled estimate of the foreground volume stands for every voxel, edges included."""
    from UNet3DSegmentLib.engine import input_checks

    monkeypatch.setattr(input_checks, "SAMPLE_VOXELS", 10_000)  # force sampling on a small array
    card = card_from_dict({**TINY_CARD, "input": {**TINY_CARD["input"], "expect": {
        "skull_stripped": True, "background_zero": False, "foreground_ml": [0, 1]}}})
    volume = np.ones((3, 301, 301), np.float32)  # all foreground: 271.8 mL at 1 mm
    [warning] = [w for w in check_channel(volume, (1.0, 1.0, 1.0), card, "T1") if "foreground covers" in w]
    assert "foreground covers 272 mL" in warning
