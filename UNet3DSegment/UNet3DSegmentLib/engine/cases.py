"""The cases of a cohort: which input files make up each case of ``unet3d-segment batch``.

- A folder: every image file is a case (``.nrrd``, ``.nhdr``, ``.nii``, ``.nii.gz``, ``.mha``,
  ``.mhd``); nnU-Net-style channel suffixes ``<case>_0000``, ``<case>_0001`` ... group the channels
  of one case, in suffix order, only when a stem's suffixes are exactly ``0000`` .. ``n-1`` with ``n``
  the model's channel count (a 1-channel model never groups; any other set of suffixes: each file is
  its own case); a stem with both a plain and a suffixed file is refused. Every sub-folder holding
  DICOM files is one case (one series).
- A CSV file with a ``case`` column and one column per model channel, named after the card's channels
  (case ignored); with one channel, a single other column is taken whatever its name; otherwise names
  that do not match are refused (never file order). Relative paths are relative to the CSV.

Nothing is read here but names: a corrupt file is found when its case runs (and fails alone).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from ..base.errors import BadInputError
from .image_io import INPUT_SUFFIXES, path_suffix

PathLike = Union[str, Path]
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Case:
    """One case: its name (the output's stem) and one input path per model channel."""

    name: str
    paths: tuple[Path, ...]
    replace: bool = False  # resume: the case is recomputed and may replace its own earlier output


def _stem(path: Path) -> str:
    suffix = path_suffix(path, INPUT_SUFFIXES)
    return path.name[: len(path.name) - len(suffix)] if suffix in INPUT_SUFFIXES else path.stem


def _is_dicom_folder(folder: Path) -> bool:
    files = [p for p in folder.iterdir() if p.is_file()]
    return any(p.suffix.lower() == ".dcm" or _dicom_magic(p) for p in files[:20])


def _dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def safe_case_name(name: str) -> str:
    """A case name usable as a file stem (no path separators, no spaces)."""
    cleaned = _SAFE.sub("_", name).strip("._")
    return cleaned or "case"


def cases_in_folder(folder: PathLike, channel_count: int = 1) -> list[Case]:
    """The cases of a folder (see the module docstring), sorted by name; ``channel_count``: the model's."""
    folder = Path(folder)
    groups: dict[str, list[tuple[int, Path]]] = {}
    suffixed: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue  # hidden files (our own temporaries among them)
        if path.is_dir():
            if _is_dicom_folder(path):
                groups.setdefault(path.name, []).append((0, path))
            continue
        if path_suffix(path, INPUT_SUFFIXES) not in INPUT_SUFFIXES or path.name.lower().endswith(".seg.nrrd"):
            continue
        stem = _stem(path)
        match = _CHANNEL.match(stem)
        if match:
            suffixed.setdefault(match["case"], []).append((int(match["channel"]), path))
        else:
            groups.setdefault(stem, []).append((0, path))
    for stem, members in suffixed.items():
        if stem in groups:
            raise BadInputError(f"{folder} holds both {groups[stem][0][1].name} and {members[0][1].name}: "
                                f"one case or two? rename one of them")
        numbers = sorted(n for n, _ in members)
        if channel_count > 1 and numbers == list(range(channel_count)):
            groups[stem] = members  # the channels of one case
        else:  # not exactly 0000..n-1 for this model: each file is its own case
            for _, path in members:
                groups.setdefault(_stem(path), []).append((0, path))
    cases = []
    for name, members in sorted(groups.items()):
        members.sort()
        cases.append(Case(safe_case_name(name), tuple(p for _, p in members)))
    if not cases:
        raise BadInputError(f"no image files or DICOM series folders in {folder}; "
                            f"expected {', '.join(INPUT_SUFFIXES)} files")
    _check_unique(cases, str(folder))
    return cases


def cases_in_csv(table: PathLike, channels: Optional[Sequence[str]] = None) -> list[Case]:
    """The cases of a CSV with a ``case`` column and one column per channel (in ``channels`` order)."""
    table = Path(table)
    try:
        with open(table, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            columns = list(rows[0].keys()) if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BadInputError(f"cannot read the case table {table}: {error}; pass a CSV file") from error
    if "case" not in columns:
        raise BadInputError(f"case table {table} has no 'case' column; its columns: {', '.join(columns) or 'none'}")
    others = [c for c in columns if c != "case"]
    by_name = {c.strip().casefold(): c for c in others}
    if channels and all(c.strip().casefold() in by_name for c in channels):
        chosen = [by_name[c.strip().casefold()] for c in channels]
    elif channels and len(channels) > 1:
        raise BadInputError(f"case table {table} has columns {', '.join(others) or 'none'} but the model's "
                            f"channels are {', '.join(channels)}; name the columns case, {', '.join(channels)}")
    else:
        chosen = others
    if not chosen:
        raise BadInputError(f"case table {table} has no channel column besides 'case'")
    if channels and len(chosen) != len(channels):
        raise BadInputError(f"case table {table} has {len(chosen)} channel column(s) ({', '.join(chosen)}) but the "
                            f"model takes {len(channels)} ({', '.join(channels)}); name the columns after them")
    cases = []
    for number, row in enumerate(rows, start=2):
        name = (row.get("case") or "").strip()
        if not name:
            raise BadInputError(f"case table {table}, line {number}: empty case name")
        paths = []
        for column in chosen:
            value = (row.get(column) or "").strip()
            if not value:
                raise BadInputError(f"case table {table}, line {number}: no path in column {column!r}")
            path = Path(value).expanduser()
            paths.append(path if path.is_absolute() else (table.parent / path))
        cases.append(Case(safe_case_name(name), tuple(paths)))
    if not cases:
        raise BadInputError(f"case table {table} lists no case")
    _check_unique(cases, str(table))
    return cases


def discover_cases(source: PathLike, channels: Optional[Sequence[str]] = None) -> list[Case]:
    """The cases of a folder or CSV file (``channels``: the model's channel names)."""
    source = Path(source)
    if source.is_dir():
        return cases_in_folder(source, len(channels) if channels else 1)
    if source.is_file() and source.suffix.lower() == ".csv":
        return cases_in_csv(source, channels)
    if not source.exists():
        raise BadInputError(f"input {source} does not exist; pass a folder of scans or a CSV of cases")
    raise BadInputError(f"input {source} is neither a folder nor a .csv case table")


def _check_unique(cases: Sequence[Case], where: str) -> None:
    seen: dict[str, Case] = {}
    for case in cases:
        key = case.name.casefold()  # outputs differing only in case collide on macOS/Windows
        if key in seen:
            raise BadInputError(f"two cases in {where} are both named {case.name!r}"
                                f"{'' if seen[key].name == case.name else f' / {seen[key].name!r}'}; rename one")
        seen[key] = case
