"""Argparse arguments derived from the option declarations (``base/options.py``), and back.

Every flag, type check, list of choices, default and help text of the command line comes from the
declaration of its option: :func:`add_options` adds them to a parser, :func:`options_from_args` builds
the typed options object from the parsed arguments. A value that fails the option's check is an
argparse error (exit 2) with the option's own one-line message.
"""

from __future__ import annotations

import argparse
from typing import Any, Iterable, Optional, TypeVar

from ..base.errors import UNet3DSegmentError
from ..base.options import Option, OptionGroup

T = TypeVar("T", bound=OptionGroup)


def add_options(
    parser: argparse.ArgumentParser | Any,
    group: type[OptionGroup],
    only: Optional[Iterable[str]] = None,
    exclude: Iterable[str] = (),
    **overrides: dict[str, Any],
) -> None:
    """Add one argument per option of ``group`` (``only`` some, minus ``exclude``).

    ``overrides`` maps an option name to argparse keyword arguments that differ for this command
    (e.g. ``help`` where ``estimate`` counts rather than runs test-time augmentation).
    """
    skipped = set(exclude)
    for declared in group.options(only):
        if declared.name not in skipped:
            parser.add_argument(declared.cli_flag, **{**argument_kwargs(declared), **overrides.get(declared.name, {})})


def argument_kwargs(declared: Option) -> dict[str, Any]:
    """``add_argument`` keyword arguments for one option."""
    kwargs: dict[str, Any] = {"dest": declared.name, "default": declared.default}
    if declared.kind is bool:
        kwargs["action"] = "store_false" if declared.default is True else "store_true"
        kwargs["help"] = declared.help
        return kwargs
    if declared.choices:
        kwargs["choices"] = list(declared.choices)
    else:
        kwargs["type"] = _parser_for(declared)
    if declared.metavar:
        kwargs["metavar"] = declared.metavar
    shown = "" if declared.default is None else f" (default {declared.default})"
    unit = f", {declared.unit}" if declared.unit and not declared.is_size else ""
    kwargs["help"] = f"{declared.help}{unit}{shown}"
    return kwargs


def _parser_for(declared: Option):
    def parse(text: str) -> Any:
        try:
            return declared.parse(text)
        except UNet3DSegmentError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    parse.__name__ = declared.name  # argparse names the type in some messages
    return parse


def options_from_args(args: argparse.Namespace, group: type[T]) -> T:
    """The ``group`` options object from parsed arguments (options this command lacks keep their default)."""
    present = {name: getattr(args, name) for name in group.OPTIONS if hasattr(args, name)}
    return group(**present)
