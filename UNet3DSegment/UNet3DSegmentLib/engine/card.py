"""Model cards: the JSON file beside a model that says what goes in, what comes out, and how.

A card (``<model>.json`` beside ``<model>.keras|.h5`` or beside a SavedModel folder ``<model>/``)
names the input channels, patch size, spacing, orientation and normalisation the network was trained
with, and the class behind each output channel (name, colour, optional DICOM terminology). The format
is described in docs/ARCHITECTURE.md; this module parses it into frozen dataclasses and rejects
anything it does not understand, naming the field, because a typo silently ignored would change the
segmentation without a word.

Axis order: ``patch_size`` is ``(z, y, x)`` like the network tensors; ``spacing`` is ``(x, y, z)`` in
mm like SimpleITK and Slicer.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ..base.errors import BadModelError
from ..base.options import SegmentOptions

FORMAT_VERSION = 1
PATCH_MULTIPLE = 8  # three 2x2x2 poolings in the seed network
# Upper bounds that keep a hostile or broken card from hanging the engine: the largest published
# segmentation models have a few hundred classes, and each class becomes one output channel of every
# voxel (and one Slicer segment). A card file is a small JSON text.
MAX_CLASSES = 1000
MAX_CHANNELS = 64
MAX_CARD_BYTES = 16 * 1024 * 1024
NATIVE = "native"
SEED_ARCHITECTURE = "unet3d-seed"

# Slicer's default terminology context and anatomic context names (vtkSegment's default terminology).
SLICER_TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
# The other terminology context Slicer loads at start: entries missing from the General Anatomy list
# (cerebrospinal fluid among them) are found there. A class names it with "context".
SLICER_DICOM_MASTER_CONTEXT = "Segmentation category and type - DICOM master list"

# Normalisation methods and their parameters with defaults (None: the parameter is required).
NORMALIZATION_PARAMETERS: Dict[str, Dict[str, Optional[float]]] = {
    "zscore-nonzero": {},
    "percentile-zscore": {"lower": 0.5, "upper": 99.5},
    "window": {"min": None, "max": None},
    "none": {},
}

# Colours for cards without colours: Slicer's GenericAnatomyColors 1-10 (tissue, bone, skin, ...).
DEFAULT_COLORS = (
    "#80ae80", "#f1d691", "#b17a65", "#6fb8d2", "#d8654f",
    "#dd8265", "#90ee90", "#c06858", "#dcf514", "#4e3f00",
)
BACKGROUND_COLOR = "#000000"

CodeTriplet = Tuple[str, str, str]
_COLOR_PATTERN = re.compile(r"^#[0-9a-fA-F]{6}$")
# Characters with a meaning in Slicer's serialised terminology ("~", "^") and segment tags ("|"),
# plus line breaks, which a NRRD header field cannot hold.
_CODE_FORBIDDEN = set("~^|\n\r")


@dataclass(frozen=True)
class Terminology:
    """DICOM code triplets ``(coding scheme designator, code value, code meaning)`` of one class."""

    category: CodeTriplet
    type: CodeTriplet
    type_modifier: Optional[CodeTriplet] = None
    context: Optional[str] = None  # Slicer terminology context holding the entry (default: General Anatomy)

    def to_slicer_string(
        self,
        context_name: Optional[str] = None,
        anatomic_context_name: str = SLICER_ANATOMIC_CONTEXT,
    ) -> str:
        """Slicer's serialised terminology entry, as in a ``.seg.nrrd`` ``TerminologyEntry`` tag.

        Seven ``~``-separated parts (vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry):
        context name, category, type, type modifier, anatomic context name, anatomic region, region
        modifier; each code is ``scheme^value^meaning`` and an absent one is ``^^``.
        """
        modifier = "^".join(self.type_modifier) if self.type_modifier else "^^"
        parts = [
            context_name or self.context or SLICER_TERMINOLOGY_CONTEXT,
            "^".join(self.category),
            "^".join(self.type),
            modifier,
            anatomic_context_name,
            "^^",
            "^^",
        ]
        return "~".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        """The card's JSON form: lists of three strings."""
        result: Dict[str, Any] = {"category": list(self.category), "type": list(self.type)}
        if self.type_modifier is not None:
            result["type_modifier"] = list(self.type_modifier)
        if self.context is not None:
            result["context"] = self.context
        return result


@dataclass(frozen=True)
class ClassInfo:
    """One output channel / label value: display name, ``#rrggbb`` colour, optional terminology."""

    name: str
    color: str
    terminology: Optional[Terminology] = None

    @property
    def rgb01(self) -> Tuple[float, float, float]:
        """The colour as ``(r, g, b)`` floats in 0..1, as Slicer's segments take it."""
        return tuple(int(self.color[i : i + 2], 16) / 255.0 for i in (1, 3, 5))  # type: ignore[return-value]

    def to_dict(self) -> Dict[str, Any]:
        result: Dict[str, Any] = {"name": self.name, "color": self.color}
        if self.terminology is not None:
            result["terminology"] = self.terminology.to_dict()
        return result


@dataclass(frozen=True)
class Normalization:
    """Intensity normalisation applied per channel; ``params`` hold every parameter, defaults filled."""

    method: str = "zscore-nonzero"
    params: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, **self.params}


@dataclass(frozen=True)
class InferenceSpec:
    """The card's optional ``inference`` section: sliding-window settings its authors measured.

    ``overlap`` is used when the user gives none (``--overlap``), in place of the engine's 0.5: a
    model whose Dice does not change with less overlap can say so and run in fewer patches.
    """

    overlap: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return {} if self.overlap is None else {"overlap": self.overlap}


@dataclass(frozen=True)
class BackgroundSpec:
    """The card's optional ``input.background``: which voxels count as background (set to 0) before the
    crop to non-zero and the normalisation.

    A voxel is background when, in every channel, it lies below ``below`` x that channel's 99th
    percentile; pieces of the remaining foreground smaller than ``min_piece_ml`` (isolated noise) are
    background too. For models trained on images whose background was exactly 0: a background with a
    little noise (after resampling or bias correction) otherwise shifts the normalisation's statistics
    and defeats the crop, and the model sees an image unlike any it was trained on.
    """

    below: float
    min_piece_ml: float = 1.0

    def to_dict(self) -> Dict[str, Any]:
        return {"below": self.below, "min_piece_ml": self.min_piece_ml}


@dataclass(frozen=True)
class NetworkSpec:
    """How to rebuild the architecture (needed only for weights-only ``.h5`` files)."""

    architecture: str = SEED_ARCHITECTURE
    base_filters: int = 32
    dropout_rate: float = 0.15

    def to_dict(self) -> Dict[str, Any]:
        return {"architecture": self.architecture, "base_filters": self.base_filters,
                "dropout_rate": self.dropout_rate}


@dataclass(frozen=True)
class InputExpectation:
    """What inputs the model was made for (the card's optional ``input.expect``), checked before inference.

    A mismatch never stops a run: ``engine/input_checks.py`` compares the input with this and the
    pipeline reports each mismatch as a ``warning`` event naming the remedy.

    - ``modality``: free text used in the warnings (``"T1-weighted MRI"``).
    - ``skull_stripped``: the input must show the brain alone (foreground at most ``foreground_ml``'s
      upper bound, default ``SKULL_STRIPPED_MAX_ML``).
    - ``background_zero``: voxels outside the object are exactly 0; at least ``min_zero_fraction`` of
      the voxels must be 0.
    - ``foreground_ml``: ``(min, max)`` mL of the foreground (voxels above 10 % of the 99.5th
      percentile of the non-zero voxels).
    - ``relative_percentiles``: ``((percentile, min, max), ...)``: percentiles of the foreground
      divided by its median (scale-free, for MR).
    - ``intensity_percentiles``: ``((percentile, min, max), ...)``: percentiles of all voxels in the
      channel's own units (CT: Hounsfield units).
    - ``spacing``: ``(min, max)`` mm that every axis's spacing must lie in.
    """

    modality: str = ""
    skull_stripped: bool = False
    background_zero: bool = False
    min_zero_fraction: float = 0.2
    foreground_ml: Optional[Tuple[float, float]] = None
    relative_percentiles: Tuple[Tuple[float, float, float], ...] = ()
    intensity_percentiles: Tuple[Tuple[float, float, float], ...] = ()
    spacing: Optional[Tuple[float, float]] = None

    def to_dict(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {}
        if self.modality:
            data["modality"] = self.modality
        data["skull_stripped"] = self.skull_stripped
        data["background_zero"] = self.background_zero
        data["min_zero_fraction"] = self.min_zero_fraction
        if self.foreground_ml is not None:
            data["foreground_ml"] = list(self.foreground_ml)
        for key in ("relative_percentiles", "intensity_percentiles"):
            bounds = getattr(self, key)
            if bounds:
                data[key] = {f"{p:g}": [low, high] for p, low, high in bounds}
        if self.spacing is not None:
            data["spacing"] = list(self.spacing)
        return data


@dataclass(frozen=True)
class InputSpec:
    """What the network takes: channel names, patch ``(z, y, x)``, grid and intensity preparation.

    ``spacing`` is ``"native"`` or ``(x, y, z)`` mm; ``orientation`` is ``"native"`` or a 3-letter
    SimpleITK ``DICOMOrient`` code such as ``"LPS"``.
    """

    channels: Tuple[str, ...]
    patch_size: Tuple[int, int, int]
    spacing: Union[str, Tuple[float, float, float]] = NATIVE
    orientation: str = NATIVE
    normalization: Normalization = field(default_factory=Normalization)
    crop_to_nonzero: bool = False
    expect: Optional[InputExpectation] = None  # the card's optional ``input.expect`` section
    background: Optional[BackgroundSpec] = None  # the card's optional ``input.background`` section

    def to_dict(self) -> Dict[str, Any]:
        data = {
            "channels": list(self.channels),
            "patch_size": list(self.patch_size),
            "spacing": self.spacing if isinstance(self.spacing, str) else list(self.spacing),
            "orientation": self.orientation,
            "normalization": self.normalization.to_dict(),
            "crop_to_nonzero": self.crop_to_nonzero,
        }
        if self.background is not None:
            data["background"] = self.background.to_dict()
        if self.expect is not None:
            data["expect"] = self.expect.to_dict()
        return data


@dataclass(frozen=True)
class ModelCard:
    """A validated model card. Build it with ``load_card``, ``card_from_dict`` or ``default_card``."""

    name: str
    input: InputSpec
    classes: Tuple[ClassInfo, ...]
    version: str = ""
    description: str = ""
    intended_use: str = ""
    network: NetworkSpec = field(default_factory=NetworkSpec)
    training: Dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    inference: Optional["InferenceSpec"] = None  # the card's optional ``inference`` section

    @property
    def patch_size(self) -> Tuple[int, int, int]:
        return self.input.patch_size

    @property
    def in_channels(self) -> int:
        return len(self.input.channels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> Tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def to_dict(self) -> Dict[str, Any]:
        """The card as JSON-ready data, keys in the documented order."""
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "intended_use": self.intended_use,
            "network": self.network.to_dict(),
            "input": self.input.to_dict(),
            "classes": [c.to_dict() for c in self.classes],
            **({"inference": self.inference.to_dict()} if self.inference is not None else {}),
            "training": copy.deepcopy(self.training),
        }


# --------------------------------------------------------------------------------------------------
# Parsing and validation


class _Fields:
    """Reads fields of one card, raising ``BadModelError`` that names the card and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> BadModelError:
        return BadModelError(f"model card {self.source}: {where} {problem}")

    def object(self, value: Any, where: str, required: tuple, optional: tuple) -> Dict[str, Any]:
        """Check ``value`` is a JSON object with the required keys and no unknown ones."""
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a JSON object, got {_show(value)}")
        allowed = required + optional
        for key in value:
            if key not in allowed:
                prefix = f"{where}." if where != "card" else ""
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.fail(
                    f"{prefix}{key}", f"is not a known field; {hint}allowed: {', '.join(allowed)}"
                )
        for key in required:
            if key not in value:
                prefix = f"{where}." if where != "card" else ""
                raise self.fail(f"{prefix}{key}", "is missing; add it (see the model card format)")
        return value

    def text(self, value: Any, where: str, allow_empty: bool = False, one_line: bool = True) -> str:
        """A string; names must be one line (they end up in NRRD header fields)."""
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            kind = "a string" if allow_empty else "a non-empty string"
            raise self.fail(where, f"must be {kind}, got {_show(value)}")
        if one_line and ("\n" in value or "\r" in value):
            raise self.fail(where, "must be one line (no line breaks)")
        return value

    def integer(self, value: Any, where: str, minimum: int) -> int:
        if not _is_int(value) or value < minimum:
            raise self.fail(where, f"must be an integer >= {minimum}, got {_show(value)}")
        return value

    def number(self, value: Any, where: str) -> float:
        if not _is_number(value):
            raise self.fail(where, f"must be a finite number, got {_show(value)}")
        return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number (``true``/``false`` are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any) -> str:
    """A short JSON rendering of a bad value for error messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def card_from_dict(data: Mapping[str, Any], source: str = "(in memory)") -> ModelCard:
    """Validate card data (parsed JSON) and return a ``ModelCard``.

    ``source`` names the card in error messages (the file name when loaded from disk). Raises
    ``BadModelError`` naming the first bad field, e.g. ``input.patch_size must be three multiples of
    8 (z, y, x), got [15, 16, 16]``.
    """
    f = _Fields(source)
    data = f.object(
        data, "card",
        required=("format_version", "name", "input", "classes"),
        optional=("version", "description", "intended_use", "network", "inference", "training"),
    )
    version = data["format_version"]
    if not _is_int(version) or version < 1:
        raise f.fail("format_version", f"must be {FORMAT_VERSION}, got {_show(version)}")
    if version > FORMAT_VERSION:
        raise f.fail(
            "format_version",
            f"is {version} but this engine reads format {FORMAT_VERSION}; update UNet3DSegment",
        )
    training = data.get("training", {})
    if not isinstance(training, dict):
        raise f.fail("training", f"must be a JSON object (free-form), got {_show(training)}")
    return ModelCard(
        format_version=version,
        name=f.text(data["name"], "name"),
        version=f.text(data.get("version", ""), "version", allow_empty=True),
        description=f.text(data.get("description", ""), "description", allow_empty=True, one_line=False),
        intended_use=f.text(data.get("intended_use", ""), "intended_use", allow_empty=True, one_line=False),
        network=_parse_network(f, data.get("network", {})),
        input=_parse_input(f, data["input"]),
        classes=_parse_classes(f, data["classes"]),
        training=copy.deepcopy(training),
        inference=_parse_inference(f, data["inference"]) if "inference" in data else None,
    )


def _parse_inference(f: _Fields, value: Any) -> InferenceSpec:
    """``inference``: the sliding window settings the model's authors recommend (``overlap``)."""
    value = f.object(value, "inference", required=(), optional=("overlap",))
    overlap = None
    if "overlap" in value:
        raw = value["overlap"]
        if not _is_number(raw) or not 0.0 <= raw < 1.0:
            raise f.fail("inference.overlap", f"must be a number >= 0 and < 1, got {_show(raw)}")
        overlap = SegmentOptions.spec("overlap").check(float(raw))
    return InferenceSpec(overlap=overlap)


def _parse_network(f: _Fields, value: Any) -> NetworkSpec:
    value = f.object(value, "network", required=(), optional=("architecture", "base_filters", "dropout_rate"))
    spec = NetworkSpec()
    dropout = f.number(value.get("dropout_rate", spec.dropout_rate), "network.dropout_rate")
    if not 0.0 <= dropout < 1.0:
        raise f.fail("network.dropout_rate", f"must be >= 0 and < 1, got {_show(value['dropout_rate'])}")
    return NetworkSpec(
        architecture=f.text(value.get("architecture", spec.architecture), "network.architecture"),
        base_filters=f.integer(value.get("base_filters", spec.base_filters), "network.base_filters", 1),
        dropout_rate=dropout,
    )


def _parse_input(f: _Fields, value: Any) -> InputSpec:
    value = f.object(
        value, "input",
        required=("channels", "patch_size"),
        optional=("spacing", "orientation", "normalization", "crop_to_nonzero", "background", "expect"),
    )
    channels = value["channels"]
    if not isinstance(channels, (list, tuple)) or not channels:
        raise f.fail("input.channels", f"must be a non-empty list of channel names, got {_show(channels)}")
    if len(channels) > MAX_CHANNELS:
        raise f.fail("input.channels", f"has {len(channels)} channels, more than the {MAX_CHANNELS} this engine "
                                       "supports; fix the model card")
    names = tuple(f.text(name, f"input.channels[{i}]") for i, name in enumerate(channels))
    if len(set(names)) != len(names):
        raise f.fail("input.channels", f"must not repeat a name, got {_show(channels)}")

    crop = value.get("crop_to_nonzero", False)
    if not isinstance(crop, bool):
        raise f.fail("input.crop_to_nonzero", f"must be true or false, got {_show(crop)}")
    return InputSpec(
        channels=names,
        patch_size=_parse_patch(f, value["patch_size"]),
        spacing=_parse_spacing(f, value.get("spacing", NATIVE)),
        orientation=_parse_orientation(f, value.get("orientation", NATIVE)),
        normalization=_parse_normalization(f, value.get("normalization", {"method": "zscore-nonzero"})),
        crop_to_nonzero=crop,
        expect=_parse_expect(f, value["expect"]) if "expect" in value else None,
        background=_parse_background(f, value["background"]) if "background" in value else None,
    )


def _parse_background(f: _Fields, value: Any) -> BackgroundSpec:
    """``input.background``: ``below`` in (0, 1) (share of the 99th percentile), ``min_piece_ml`` >= 0."""
    where = "input.background"
    value = f.object(value, where, required=("below",), optional=("min_piece_ml",))
    below = f.number(value["below"], f"{where}.below")
    if not 0.0 < below < 1.0:
        raise f.fail(f"{where}.below", f"must be > 0 and < 1 (a share of the 99th percentile), got {_show(value['below'])}")
    piece = f.number(value.get("min_piece_ml", 1.0), f"{where}.min_piece_ml")
    if not 0.0 <= piece <= 1000.0:
        raise f.fail(f"{where}.min_piece_ml", f"must be between 0 and 1000 mL, got {_show(value['min_piece_ml'])}")
    return BackgroundSpec(below=below, min_piece_ml=piece)


EXPECT_FIELDS = ("modality", "skull_stripped", "background_zero", "min_zero_fraction", "foreground_ml",
                 "relative_percentiles", "intensity_percentiles", "spacing")
SKULL_STRIPPED_MAX_ML = 2400.0  # a brain alone (cerebrospinal fluid included) stays below this


def _parse_expect(f: _Fields, value: Any) -> InputExpectation:
    """``input.expect``: every field optional, each checked with a one-line error naming it."""
    where = "input.expect"
    value = f.object(value, where, required=(), optional=EXPECT_FIELDS)
    flags = {}
    for key in ("skull_stripped", "background_zero"):
        flag = value.get(key, False)
        if not isinstance(flag, bool):
            raise f.fail(f"{where}.{key}", f"must be true or false, got {_show(flag)}")
        flags[key] = flag
    zero = f.number(value.get("min_zero_fraction", 0.2), f"{where}.min_zero_fraction")
    if not 0.0 <= zero < 1.0:
        raise f.fail(f"{where}.min_zero_fraction", f"must be >= 0 and < 1, got {_show(value['min_zero_fraction'])}")
    return InputExpectation(
        modality=f.text(value.get("modality", ""), f"{where}.modality", allow_empty=True),
        skull_stripped=flags["skull_stripped"],
        background_zero=flags["background_zero"],
        min_zero_fraction=zero,
        foreground_ml=_parse_range(f, value.get("foreground_ml"), f"{where}.foreground_ml", "mL", positive=False),
        relative_percentiles=_parse_percentiles(f, value.get("relative_percentiles"),
                                                f"{where}.relative_percentiles", positive=True),
        intensity_percentiles=_parse_percentiles(f, value.get("intensity_percentiles"),
                                                 f"{where}.intensity_percentiles", positive=False),
        spacing=_parse_range(f, value.get("spacing"), f"{where}.spacing", "mm", positive=True),
    )


def _parse_range(f: _Fields, value: Any, where: str, unit: str, positive: bool) -> Optional[Tuple[float, float]]:
    """``[min, max]`` with min <= max, both >= 0 (``positive``: > 0); None when absent."""
    if value is None:
        return None
    ok = (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
          and all(v > 0 if positive else v >= 0 for v in value) and value[0] <= value[1])
    if not ok:
        sign = "positive" if positive else "non-negative"
        raise f.fail(where, f"must be [min, max] in {unit}, two {sign} numbers with min <= max, got {_show(value)}")
    return (float(value[0]), float(value[1]))


def _parse_percentiles(f: _Fields, value: Any, where: str, positive: bool) -> Tuple[Tuple[float, float, float], ...]:
    """``{"1": [min, max], "99": [min, max]}``: percentile (0-100) -> bounds; () when absent."""
    if value is None:
        return ()
    if not isinstance(value, dict) or not value:
        raise f.fail(where, f'must be a JSON object such as {{"1": [min, max], "99": [min, max]}}, got {_show(value)}')
    bounds = []
    for key, pair in value.items():
        try:
            percentile = float(key)
        except ValueError:
            percentile = float("nan")
        if not 0.0 <= percentile <= 100.0:  # NaN fails too
            raise f.fail(f"{where}.{key}", "is not a percentile; use a number from 0 to 100 as the key")
        ok = (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_is_number(v) for v in pair)
              and pair[0] <= pair[1] and (not positive or pair[0] >= 0))
        if not ok:
            kind = "two non-negative numbers" if positive else "two numbers"
            raise f.fail(f"{where}.{key}", f"must be [min, max], {kind} with min <= max, got {_show(pair)}")
        bounds.append((percentile, float(pair[0]), float(pair[1])))
    return tuple(sorted(bounds))


def _parse_patch(f: _Fields, value: Any) -> Tuple[int, int, int]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(_is_int(p) and p > 0 and p % PATCH_MULTIPLE == 0 for p in value)
    )
    if not ok:
        raise f.fail(
            "input.patch_size", f"must be three multiples of {PATCH_MULTIPLE} (z, y, x), got {_show(value)}"
        )
    return (value[0], value[1], value[2])


def _parse_spacing(f: _Fields, value: Any) -> Union[str, Tuple[float, float, float]]:
    if value == NATIVE:
        return NATIVE
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(_is_number(s) and s > 0 for s in value)
    )
    if not ok:
        raise f.fail(
            "input.spacing", f'must be "native" or three positive numbers [x, y, z] in mm, got {_show(value)}'
        )
    return (float(value[0]), float(value[1]), float(value[2]))


def _parse_orientation(f: _Fields, value: Any) -> str:
    if value == NATIVE:
        return NATIVE
    axes = ("RL", "AP", "SI")
    ok = (
        isinstance(value, str)
        and len(value) == 3
        and all(any(letter in pair for letter in value) for pair in axes)
        and all(letter in "RLAPSI" for letter in value)
    )
    if not ok:
        raise f.fail(
            "input.orientation",
            f'must be "native" or three upper-case letters, one of R/L, A/P and S/I each (e.g. "LPS"), '
            f"got {_show(value)}",
        )
    return value


def _parse_normalization(f: _Fields, value: Any) -> Normalization:
    where = "input.normalization"
    if not isinstance(value, dict):
        raise f.fail(where, f"must be a JSON object with a method, got {_show(value)}")
    method = value.get("method")
    if method not in NORMALIZATION_PARAMETERS:
        allowed = ", ".join(NORMALIZATION_PARAMETERS)
        raise f.fail(f"{where}.method", f"must be one of {allowed}, got {_show(method)}")
    defaults = NORMALIZATION_PARAMETERS[method]
    f.object(value, where, required=("method",) + tuple(k for k, v in defaults.items() if v is None),
             optional=tuple(k for k, v in defaults.items() if v is not None))
    params = {
        key: f.number(value.get(key, default), f"{where}.{key}") for key, default in defaults.items()
    }
    if method == "percentile-zscore" and not 0.0 <= params["lower"] < params["upper"] <= 100.0:
        raise f.fail(
            where,
            "lower and upper must satisfy 0 <= lower < upper <= 100, "
            f"got {params['lower']}, {params['upper']}",
        )
    if method == "window" and not params["min"] < params["max"]:
        raise f.fail(where, f"min must be below max, got {params['min']}, {params['max']}")
    return Normalization(method=method, params=params)


def _parse_classes(f: _Fields, value: Any) -> Tuple[ClassInfo, ...]:
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise f.fail("classes", f"must list at least 2 classes (background first), got {_show(value)}")
    if len(value) > MAX_CLASSES:  # checked first: every class costs an output channel per voxel
        raise f.fail("classes", f"has {len(value)} classes, more than the {MAX_CLASSES} this engine supports; "
                                "fix the model card (one class per output channel of the model)")
    classes = []
    for index, item in enumerate(value):
        where = f"classes[{index}]"
        item = f.object(item, where, required=("name",), optional=("color", "terminology"))
        color = item.get("color", _default_color(index))
        if not isinstance(color, str) or not _COLOR_PATTERN.match(color):
            raise f.fail(f"{where}.color", f'must be "#rrggbb" (hexadecimal), got {_show(color)}')
        terminology = item.get("terminology")
        if terminology is not None:
            terminology = _parse_terminology(f, terminology, f"{where}.terminology")
        name = f.text(item["name"], f"{where}.name")
        classes.append(ClassInfo(name=name, color=color.lower(), terminology=terminology))
    seen: set = set()
    for index, info in enumerate(classes):  # a set: linear in the number of classes
        if info.name in seen:
            raise f.fail(f"classes[{index}].name", f"repeats {info.name!r}; give every class its own name")
        seen.add(info.name)
    return tuple(classes)


def _parse_terminology(f: _Fields, value: Any, where: str) -> Terminology:
    value = f.object(value, where, required=("category", "type"), optional=("type_modifier", "context"))
    modifier = value.get("type_modifier")
    context = value.get("context")
    if context is not None:
        bad = not isinstance(context, str) or not context.strip() or any(c in context for c in "~^|\n\r")
        if bad:
            raise f.fail(f"{where}.context", f"must be the name of a Slicer terminology context without ~ ^ | or "
                         f'line breaks, e.g. "{SLICER_DICOM_MASTER_CONTEXT}", got {_show(context)}')
    return Terminology(
        category=_parse_code(f, value["category"], f"{where}.category"),
        type=_parse_code(f, value["type"], f"{where}.type"),
        type_modifier=None if modifier is None else _parse_code(f, modifier, f"{where}.type_modifier"),
        context=context,
    )


def _parse_code(f: _Fields, value: Any, where: str) -> CodeTriplet:
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    ok = ok and all(isinstance(v, str) and v.strip() for v in value)
    if not ok:
        raise f.fail(
            where,
            f"must be a code triplet [coding scheme designator, code value, code meaning] of non-empty "
            f'strings, e.g. ["SCT", "65216001", "Cerebrospinal fluid"], got {_show(value)}',
        )
    bad = sorted({c for v in value for c in v if c in _CODE_FORBIDDEN})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise f.fail(where, f"must not contain {shown} (Slicer uses them as separators)")
    return (value[0], value[1], value[2])


def _default_color(index: int) -> str:
    return BACKGROUND_COLOR if index == 0 else DEFAULT_COLORS[(index - 1) % len(DEFAULT_COLORS)]


# --------------------------------------------------------------------------------------------------
# Files


def load_card(path: Union[str, Path]) -> ModelCard:
    """Read and validate a card file; ``BadModelError`` if missing, not JSON, or invalid."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CARD_BYTES:
            raise BadModelError(
                f"model card {path} is {size // (1024 * 1024)} MiB, more than the {MAX_CARD_BYTES // (1024 * 1024)} "
                "MiB a card may have; a card is a small JSON text, check that this is the right file"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise BadModelError(f"model card {path} not found; check the path") from error
    except (OSError, UnicodeDecodeError) as error:
        raise BadModelError(f"model card {path} cannot be read ({error}); check the file") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadModelError(
            f"model card {path.name} is not valid JSON (line {error.lineno}, column {error.colno}: "
            f"{error.msg}); fix the syntax"
        ) from error
    return card_from_dict(data, source=path.name)


def save_card(card: ModelCard, path: Union[str, Path]) -> Path:
    """Write ``card`` as indented UTF-8 JSON, atomically (temporary file + rename); returns the path.

    An existing card is replaced. The file gets the mode a plain ``open(path, "w")`` gives (0666 less
    the umask), since a card is meant to be read by others.
    """
    from .image_io import atomic_write  # SimpleITK is loaded only when a card is written

    path = Path(path)
    text = json.dumps(card.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())

    atomic_write(path, write, overwrite=True)
    return path


def default_card(
    num_classes: int = 4,
    in_channels: int = 1,
    patch_size: Tuple[int, int, int] = (64, 64, 64),
) -> ModelCard:
    """The seed defaults for a model without a card.

    One channel "image" (or "channel 0".."channel n-1"), native spacing and orientation, z-score over
    non-zero voxels, no cropping, classes "Background", "Class 1".. with Slicer's generic colours.
    """
    channels = ["image"] if in_channels == 1 else [f"channel {i}" for i in range(in_channels)]
    data = {
        "format_version": FORMAT_VERSION,
        "name": "unnamed-model",
        "version": "",
        "description": "No model card was found; seed defaults are assumed.",
        "intended_use": "Unknown: the model came without a card.",
        "network": NetworkSpec().to_dict(),
        "input": {
            "channels": channels,
            "patch_size": [int(p) for p in patch_size],
            "spacing": NATIVE,
            "orientation": NATIVE,
            "normalization": {"method": "zscore-nonzero"},
            "crop_to_nonzero": False,
        },
        "classes": [{"name": "Background" if i == 0 else f"Class {i}"} for i in range(num_classes)],
        "training": {},
    }
    return card_from_dict(data, source="(seed defaults)")


def card_path_for_model(model_path: Union[str, Path]) -> Path:
    """Where a model's card lives: ``x.keras`` or ``x.h5`` -> ``x.json``; SavedModel ``x/`` -> ``x.json``."""
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path.with_name(model_path.name + ".json")
    return model_path.with_suffix(".json")


def card_for_model(model_path: Union[str, Path]) -> Optional[ModelCard]:
    """The card beside the model, or ``None`` when there is none (the caller then uses defaults)."""
    path = card_path_for_model(model_path)
    return load_card(path) if path.is_file() else None
