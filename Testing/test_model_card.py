"""Model cards: parsing, defaults, round trips, file handling, and one named error per bad field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import TINY_CARD

from UNet3DSegmentLib.base.errors import BadModelError
from UNet3DSegmentLib.engine.card import (
    SLICER_ANATOMIC_CONTEXT,
    SLICER_TERMINOLOGY_CONTEXT,
    ClassInfo,
    ModelCard,
    Normalization,
    Terminology,
    card_for_model,
    card_from_dict,
    card_path_for_model,
    default_card,
    load_card,
    save_card,
)

CSF = ("SCT", "65216001", "Cerebrospinal fluid")
BODY_SUBSTANCE = ("SCT", "91720002", "Body substance")


def tiny_card_data() -> dict:
    return copy.deepcopy(TINY_CARD)


def test_tiny_card_fields():
    card = card_from_dict(tiny_card_data(), source="tiny.json")
    assert isinstance(card, ModelCard)
    assert card.format_version == 1
    assert card.name == "tiny-test-model" and card.version == "0.0.1"
    assert card.network.architecture == "unet3d-seed"
    assert (card.network.base_filters, card.network.dropout_rate) == (2, 0.15)
    assert card.input.channels == ("T1",)
    assert card.input.patch_size == card.patch_size == (16, 16, 16)
    assert (card.input.spacing, card.input.orientation) == ("native", "native")
    assert card.input.normalization == Normalization("zscore-nonzero", {})
    assert card.input.crop_to_nonzero is False
    assert (card.in_channels, card.num_classes) == (1, 4)
    assert card.class_names == ("Background", "CSF", "Grey matter", "White matter")
    assert card.classes[1] == ClassInfo("CSF", "#4a90d9", Terminology(BODY_SUBSTANCE, CSF))
    assert card.classes[2].terminology is None
    assert card.training == {}


def test_rgb01():
    assert ClassInfo("x", "#ff8000").rgb01 == (1.0, 128 / 255, 0.0)
    assert ClassInfo("x", "#000000").rgb01 == (0.0, 0.0, 0.0)
    classes = [{"name": "bg", "color": "#4A90D9"}, {"name": "a"}]
    card = card_from_dict({**tiny_card_data(), "classes": classes})
    assert card.classes[0].color == "#4a90d9"  # normalised to lower case
    assert card.classes[0].rgb01 == pytest.approx((0x4A / 255, 0x90 / 255, 0xD9 / 255))


def test_round_trip_through_dict_and_file(tmp_path: Path):
    data = tiny_card_data()
    data["input"].update(
        spacing=[1.0, 1.0, 2.5], orientation="RAS", crop_to_nonzero=True,
        normalization={"method": "percentile-zscore", "lower": 1, "upper": 99},
    )
    data["classes"][2]["terminology"] = {
        "category": ["SCT", "123037004", "Anatomical Structure"],
        "type": ["SCT", "64033007", "Kidney"],
        "type_modifier": ["SCT", "24028007", "Right"],
    }
    data["training"] = {"command": "train --epochs 3", "dice": {"CSF": 0.81}, "seed": 7}
    card = card_from_dict(data)
    assert card.input.spacing == (1.0, 1.0, 2.5)
    assert card.input.normalization.params == {"lower": 1.0, "upper": 99.0}
    assert card_from_dict(card.to_dict()) == card
    assert card.to_dict() == {**data, "input": {**data["input"], "normalization": {
        "method": "percentile-zscore", "lower": 1.0, "upper": 99.0}}}

    path = save_card(card, tmp_path / "model.json")
    assert load_card(path) == card
    assert json.loads(path.read_text(encoding="utf-8")) == card.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]  # no temporary file left


def test_loaded_card_does_not_alias_the_input_dict():
    data = tiny_card_data()
    data["training"] = {"losses": [1.0, 0.5]}
    card = card_from_dict(data)
    data["training"]["losses"].append(0.1)
    assert card.training == {"losses": [1.0, 0.5]}


def test_save_card_replaces_atomically_and_keeps_unicode(tmp_path: Path):
    path = tmp_path / "m.json"
    path.write_text("old", encoding="utf-8")
    data = tiny_card_data()
    data["description"] = "Liquor cérébro-spinal, 脳脊髄液"
    save_card(card_from_dict(data), path)
    assert load_card(path).description == "Liquor cérébro-spinal, 脳脊髄液"
    assert "脳脊髄液" in path.read_text(encoding="utf-8")


def test_defaults_for_optional_fields():
    data = {
        "format_version": 1,
        "name": "minimal",
        "input": {"channels": ["CT"], "patch_size": [32, 32, 32]},
        "classes": [{"name": "Background"}, {"name": "Liver"}, {"name": "Spleen"}],
    }
    card = card_from_dict(data)
    assert (card.version, card.description, card.intended_use, card.training) == ("", "", "", {})
    assert (card.network.architecture, card.network.base_filters, card.network.dropout_rate) == (
        "unet3d-seed", 32, 0.15)
    assert card.input.spacing == "native" and card.input.orientation == "native"
    assert card.input.normalization == Normalization("zscore-nonzero", {})
    assert card.input.crop_to_nonzero is False
    assert [c.color for c in card.classes] == ["#000000", "#80ae80", "#f1d691"]


def test_normalization_defaults_and_window():
    data = tiny_card_data()
    data["input"]["normalization"] = {"method": "percentile-zscore"}
    assert card_from_dict(data).input.normalization.params == {"lower": 0.5, "upper": 99.5}
    data["input"]["normalization"] = {"method": "window", "min": -100, "max": 300}
    assert card_from_dict(data).input.normalization == Normalization("window", {"min": -100.0, "max": 300.0})
    data["input"]["normalization"] = {"method": "none"}
    assert card_from_dict(data).input.normalization.params == {}


def test_default_card():
    card = default_card()
    assert card.name == "unnamed-model"
    assert card.input.channels == ("image",)
    assert card.patch_size == (64, 64, 64)
    assert (card.input.spacing, card.input.orientation) == ("native", "native")
    assert card.input.normalization.method == "zscore-nonzero"
    assert card.class_names == ("Background", "Class 1", "Class 2", "Class 3")
    assert [c.color for c in card.classes] == ["#000000", "#80ae80", "#f1d691", "#b17a65"]
    assert (card.network.base_filters, card.network.dropout_rate) == (32, 0.15)
    other = default_card(num_classes=2, in_channels=3, patch_size=(16, 32, 48))
    assert other.input.channels == ("channel 0", "channel 1", "channel 2")
    assert other.class_names == ("Background", "Class 1")
    assert other.patch_size == (16, 32, 48)
    with pytest.raises(BadModelError, match=r"input.patch_size must be three multiples of 8"):
        default_card(patch_size=(20, 20, 20))


def test_terminology_string_matches_slicer_format():
    # vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry: 7 parts joined by "~", codes
    # "scheme^value^meaning", empty code "^^".
    csf = Terminology(BODY_SUBSTANCE, CSF)
    assert csf.to_slicer_string() == (
        "Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^91720002^Body substance~SCT^65216001^Cerebrospinal fluid~^^"
        "~Anatomic codes - DICOM master list~^^~^^"
    )
    kidney = Terminology(("SCT", "123037004", "Anatomical Structure"), ("SCT", "64033007", "Kidney"),
                         ("SCT", "24028007", "Right"))
    assert kidney.to_slicer_string(context_name="My list") == (
        "My list~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~SCT^24028007^Right"
        "~Anatomic codes - DICOM master list~^^~^^"
    )
    assert SLICER_TERMINOLOGY_CONTEXT.endswith("3D Slicer General Anatomy list")
    assert SLICER_ANATOMIC_CONTEXT == "Anatomic codes - DICOM master list"


def test_terminology_string_equals_slicers_own():
    slicer = pytest.importorskip("slicer")  # slicer-core (test extra)
    tissue = ("SCT", "85756007", "Tissue")
    assert Terminology(tissue, tissue).to_slicer_string() == slicer.vtkSegment().GetTerminology()
    kidney = Terminology(("SCT", "123037004", "Anatomical Structure"), ("SCT", "64033007", "Kidney"),
                         ("SCT", "24028007", "Right"))
    entry = slicer.vtkSlicerTerminologyEntry()
    logic = slicer.vtkSlicerTerminologiesModuleLogic
    assert logic.DeserializeTerminologyEntry(kidney.to_slicer_string(), entry)
    assert entry.GetTypeObject().GetCodeMeaning() == "Kidney"
    assert entry.GetTypeModifierObject().GetCodeValue() == "24028007"
    assert logic.SerializeTerminologyEntry(entry) == kidney.to_slicer_string()


def test_card_paths(tmp_path: Path):
    assert card_path_for_model(tmp_path / "brain.keras") == tmp_path / "brain.json"
    assert card_path_for_model(tmp_path / "brain.h5") == tmp_path / "brain.json"
    saved = tmp_path / "brain_saved"
    saved.mkdir()
    assert card_path_for_model(saved) == tmp_path / "brain_saved.json"
    assert card_path_for_model(str(saved) + "/") == tmp_path / "brain_saved.json"


def test_card_for_model(tmp_path: Path):
    model = tmp_path / "m.keras"
    assert card_for_model(model) is None
    (tmp_path / "m.json").write_text(json.dumps(TINY_CARD), encoding="utf-8")
    assert card_for_model(model) == card_from_dict(TINY_CARD)
    (tmp_path / "m.json").write_text("{", encoding="utf-8")
    with pytest.raises(BadModelError, match=r"model card m.json is not valid JSON \(line 1, column 2"):
        card_for_model(model)


def test_load_card_errors(tmp_path: Path):
    with pytest.raises(BadModelError, match="not found"):
        load_card(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[]", encoding="utf-8")
    with pytest.raises(BadModelError, match=r"^model card list.json: card must be a JSON object, got \[\]$"):
        load_card(tmp_path / "list.json")


def _set(data: dict, dotted: str, value) -> None:
    """Set ``a.b[2].c`` in nested card data; ``value`` DELETE removes the key."""
    keys = []
    for part in dotted.split("."):
        name, _, index = part.partition("[")
        keys.append(name)
        if index:
            keys.append(int(index.rstrip("]")))
    target = data
    for key in keys[:-1]:
        target = target[key]
    if value is DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value


DELETE = object()

# (field to change, new value, expected message after "model card tiny.json: ")
BAD_FIELDS = [
    ("input.patch_size", [15, 16, 16],
     "input.patch_size must be three multiples of 8 (z, y, x), got [15, 16, 16]"),
    ("input.patch_size", [16, 16], "input.patch_size must be three multiples of 8"),
    ("input.patch_size", [16, 16, True], "input.patch_size must be three multiples of 8"),
    ("input.patch_size", [0, 16, 16], "input.patch_size must be three multiples of 8"),
    ("input.patch_size", DELETE, "input.patch_size is missing"),
    ("input.channels", [], "input.channels must be a non-empty list"),
    ("input.channels", ["T1", "T1"], "input.channels must not repeat a name"),
    ("input.channels", ["T1", ""], "input.channels[1] must be a non-empty string"),
    ("input.spacing", [1, 1], 'input.spacing must be "native" or three positive numbers [x, y, z] in mm'),
    ("input.spacing", [1, 0, 1], "input.spacing must be"),
    ("input.spacing", "iso", "input.spacing must be"),
    ("input.orientation", "LPR", 'input.orientation must be "native" or three upper-case letters'),
    ("input.orientation", "lps", "input.orientation must be"),
    ("input.orientation", "LP", "input.orientation must be"),
    ("input.normalization", "zscore", "input.normalization must be a JSON object"),
    ("input.normalization", {"method": "minmax"}, "input.normalization.method must be one of zscore-nonzero, "
     "percentile-zscore, window, none, got \"minmax\""),
    ("input.normalization", {"method": "window", "min": 0}, "input.normalization.max is missing"),
    ("input.normalization", {"method": "window", "min": 5, "max": 1},
     "input.normalization min must be below max"),
    ("input.normalization", {"method": "zscore-nonzero", "lower": 1},
     "input.normalization.lower is not a known field; allowed: method"),
    ("input.normalization", {"method": "percentile-zscore", "lower": 60, "upper": 50},
     "input.normalization lower and upper must satisfy 0 <= lower < upper <= 100"),
    ("input.normalization", {"method": "percentile-zscore", "upper": "99"},
     "input.normalization.upper must be a finite number"),
    ("input.crop_to_nonzero", "yes", "input.crop_to_nonzero must be true or false"),
    ("input.patchsize", [16, 16, 16], "input.patchsize is not a known field; did you mean 'patch_size'?"),
    ("input", [], "input must be a JSON object"),
    ("classes", [{"name": "Background"}], "classes must list at least 2 classes"),
    ("classes[1].color", "blue", 'classes[1].color must be "#rrggbb" (hexadecimal), got "blue"'),
    ("classes[1].color", "#12345", "classes[1].color must be"),
    ("classes[2].name", "CSF", "classes[2].name repeats 'CSF'"),
    ("classes[2].name", "", "classes[2].name must be a non-empty string"),
    ("classes[2].name", "a\nb", "classes[2].name must be one line"),
    ("classes[2].colour", "#ffffff", "classes[2].colour is not a known field; did you mean 'color'?"),
    ("classes[1].terminology.type", ["SCT", "65216001"],
     "classes[1].terminology.type must be a code triplet"),
    ("classes[1].terminology.category", ["SCT", "", "x"],
     "classes[1].terminology.category must be a code triplet"),
    ("classes[1].terminology.type", ["SCT", "1~2", "x"], "classes[1].terminology.type must not contain '~'"),
    ("classes[1].terminology.type_modifier", ["SCT", "1", "a^b|c"],
     "classes[1].terminology.type_modifier must not contain '^' '|'"),
    ("classes[1].terminology.region", ["SCT", "1", "x"],
     "classes[1].terminology.region is not a known field"),
    ("classes[1].terminology.type", DELETE, "classes[1].terminology.type is missing"),
    ("format_version", 2, "format_version is 2 but this engine reads format 1; update UNet3DSegment"),
    ("format_version", "1", 'format_version must be 1, got "1"'),
    ("format_version", DELETE, "format_version is missing"),
    ("name", 3, "name must be a non-empty string, got 3"),
    ("version", None, "version must be a string, got null"),
    ("description", 5, "description must be a string, got 5"),
    ("network.base_filters", 0, "network.base_filters must be an integer >= 1, got 0"),
    ("network.base_filters", 2.0, "network.base_filters must be an integer >= 1"),
    ("network.dropout_rate", 1.0, "network.dropout_rate must be >= 0 and < 1, got 1.0"),
    ("network.depth", 4, "network.depth is not a known field"),
    ("training", [], "training must be a JSON object (free-form)"),
    ("nmae", "x", "nmae is not a known field; did you mean 'name'?"),
    ("input.background", 0.1, "input.background must be a JSON object"),
    ("input.background", {}, "input.background.below is missing"),
    ("input.background", {"below": 0}, "input.background.below must be > 0 and < 1 (a share of the 99th percentile), got 0"),
    ("input.background", {"below": 1.5}, "input.background.below must be > 0 and < 1"),
    ("input.background", {"below": 0.1, "min_piece_ml": -1}, "input.background.min_piece_ml must be between 0 and 1000 mL"),
    ("input.background", {"below": 0.1, "min_piece": 1}, "input.background.min_piece is not a known field"),
    ("inference", [], "inference must be a JSON object"),
    ("inference", {"overlap": 1.0}, "inference.overlap must be a number >= 0 and < 1, got 1.0"),
    ("inference", {"overlap": "0.25"}, 'inference.overlap must be a number >= 0 and < 1, got "0.25"'),
    ("inference", {"overlaps": 0.25}, "inference.overlaps is not a known field; did you mean 'overlap'?"),
]


@pytest.mark.parametrize(
    "where, value, message", BAD_FIELDS, ids=[f"{w}={v!r}"[:40] for w, v, _ in BAD_FIELDS]
)
def test_every_bad_field_is_named(where, value, message):
    data = tiny_card_data()
    _set(data, where, value)
    with pytest.raises(BadModelError) as caught:
        card_from_dict(data, source="tiny.json")
    text = str(caught.value)
    assert text.startswith(f"model card tiny.json: {message}"), text
    assert "\n" not in text


def test_background_and_inference_sections_round_trip():
    data = tiny_card_data()
    data["input"]["background"] = {"below": 0.15}
    data["inference"] = {"overlap": 0.25}
    card = card_from_dict(data)
    assert card.input.background.below == 0.15 and card.input.background.min_piece_ml == 1.0
    assert card.inference.overlap == 0.25
    assert card_from_dict(card.to_dict()) == card
    plain = card_from_dict(tiny_card_data())
    assert plain.input.background is None and plain.inference is None
    assert "background" not in plain.to_dict()["input"] and "inference" not in plain.to_dict()


def test_description_may_span_lines():
    data = tiny_card_data()
    data["description"] = "Line one.\nLine two."
    assert card_from_dict(data).description == "Line one.\nLine two."


def test_training_is_free_form():
    data = tiny_card_data()
    data["training"] = {"anything": {"nested": [1, "two", None]}, "Dice": 0.9}
    assert card_from_dict(data).training == data["training"]


def test_programmatic_tuples_are_accepted():
    data = tiny_card_data()
    data["input"]["patch_size"] = (16, 24, 32)
    data["input"]["channels"] = ("T1", "T2")
    assert card_from_dict(data).input == card_from_dict({**data, "input": {
        **data["input"], "patch_size": [16, 24, 32], "channels": ["T1", "T2"]}}).input


def test_saved_card_is_readable_by_others(tmp_path: Path):
    """The atomic save must not leave mkstemp's private 0600 mode on a card meant to be shared."""
    import os

    old = os.umask(0o022)
    try:
        path = save_card(card_from_dict(copy.deepcopy(TINY_CARD)), tmp_path / "shared.json")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
