"""The Slicer panel's options: enums and ranges for its parameter node, and the options read back.

The parameter node (``UNet3DSegment.py``) declares one field per option the panel shows, named in
camelCase (``batchSize`` for ``batch_size``). Its enums, ranges and defaults come from here, and
:func:`options_from_parameters` turns the node into the ``SegmentOptions`` the logic takes, for
every declared option the node has a field for. A new option therefore needs no change here.
"""

from __future__ import annotations

import enum
from typing import Any

from ..base.options import SegmentOptions, choice_enum

# One Enum per option with choices (``device`` -> ``Device``), its labels from the declaration.
_ENUMS = {o.name: choice_enum(o, "".join(p.capitalize() for p in o.name.split("_")))
          for o in SegmentOptions.OPTIONS.values() if o.choices}
Device, Precision, Backend = _ENUMS["device"], _ENUMS["precision"], _ENUMS["backend"]


def choiceEnum(name: str) -> type[enum.Enum]:
    """The parameter node's type for option ``name``: an Enum of its declared choices (labels for the combo box)."""
    return _ENUMS[SegmentOptions.spec(name).name]


def default(name: str) -> Any:
    """The declared default of option ``name`` as the parameter node holds it (enum member, "" for no size)."""
    declared = SegmentOptions.spec(name)
    if declared.choices:
        return _ENUMS[declared.name](declared.default)
    if declared.default is None and declared.is_size:
        return ""  # a text field: empty means no limit
    return declared.panel_default()  # None with an auto label: the notch below the range


def panel_range(name: str) -> tuple[float, float]:
    """``(minimum, maximum)`` for the option's slider or spin box (``WithinRange``)."""
    return SegmentOptions.spec(name).panel_range()


def options_from_parameters(parameters: Any) -> SegmentOptions:
    """``SegmentOptions`` from every declared option the parameter node has a field for.

    Enum members give their value, a size text such as ``"6G"`` is parsed (empty: no limit); a bad
    value raises ``BadInputError`` naming the option.
    """
    values = {}
    for declared in SegmentOptions.OPTIONS.values():
        try:
            value = getattr(parameters, declared.camel)
        except AttributeError:
            continue  # not on the panel: the engine's default
        value = value.value if isinstance(value, enum.Enum) else value
        values[declared.name] = declared.from_panel(value)  # the "Model's choice" notch reads as None
    return SegmentOptions.from_values(values)
