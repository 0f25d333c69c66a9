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
    parser: Any,
    declared_in: type[OptionGroup],
    only: Optional[Iterable[str]] = None,
    exclude: Iterable[str] = (),
    section: Optional[str] = None,
    **overrides: dict[str, Any],
) -> None:
    """Add one argument per option of ``declared_in`` (``only`` some, or one ``section``, minus ``exclude``).

    ``overrides`` maps an option name to argparse keyword arguments that differ for this command
    (e.g. ``help`` where ``estimate`` counts rather than runs test-time augmentation).
    """
    skipped = set(exclude)
    for declared in declared_in.options(only, section):
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


def check_inputs_exist(inputs: Iterable[str]) -> None:
    """A missing input is a one-line error before anything expensive starts."""
    from pathlib import Path

    from ..base.errors import BadInputError

    for item in inputs:
        if not Path(item).exists():
            raise BadInputError(f"input {item} does not exist; check the path")


def start_runtime(options: Any) -> str:
    """Choose the Keras backend (before Keras is imported) and configure its device; return the device.

    ``options`` is a ``SegmentOptions`` (backend, device, gpu_index, threads, gpu_memory_limit).
    """
    from ..runtime.backends import backend_installed, configure_runtime, select_backend

    select_backend(options.backend, options.device, options.gpu_index, options.gpu_memory_limit)
    if backend_installed("tensorflow"):  # Keras loads TensorFlow on every backend when it is there
        from ..runtime.tensorflow_setup import import_tensorflow_quietly

        import_tensorflow_quietly()
    return configure_runtime(options.device, threads=options.threads, gpu_index=options.gpu_index,
                             gpu_memory_limit=options.gpu_memory_limit)
