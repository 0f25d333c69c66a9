"""Sizes and durations as people write and read them: ``"6G"`` in, ``"1.50 GiB"`` and ``"1 min 15 s"`` out.

Sizes have one representation in code, a number of bytes; :func:`parse_size` is the one parser from
text (command line, Slicer panel, web page) and :func:`format_size` the one formatter.
"""

from __future__ import annotations

import re

from .errors import BadInputError

KIB = 1024
MIB = 1024 ** 2
GIB = 1024 ** 3
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": 1024 ** 4}


def parse_size(text: object) -> int:
    """Bytes for ``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"2GB"`` or a plain byte count (binary units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise BadInputError(f"memory size {text!r} is not a size such as 4G, 512M or 1.5GiB")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < 1:
        raise BadInputError(f"memory size must be positive, got {text!r}")
    return int(value)


def format_size(nbytes: float) -> str:
    """``1.50 GiB`` / ``300 MiB`` style text."""
    if nbytes >= GIB:
        return f"{nbytes / GIB:.2f} GiB"
    return f"{nbytes / MIB:.0f} MiB"


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1 min 15 s"``; under a minute in seconds, over an hour in hours and minutes."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"
