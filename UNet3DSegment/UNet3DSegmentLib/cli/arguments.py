"""Argparse arguments derived from the option declarations (``base/options.py``), and back.

Every flag, type check, list of choices, default and help text of the command line comes from the
declaration of its option: :func:`add_options` adds them to a parser, :func:`options_from_args` builds
the typed options object from the parsed arguments. A value that fails the option's check is a
usage error with the option's own one-line message: :class:`OneLineParser` raises
:class:`UsageError` instead of printing argparse's usage block, and the command line reports it as one
``unet3d-segment: error: ...`` line with exit code 3 (bad input), like every other bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
from typing import Any, Iterable, Iterator, Optional, TypeVar

from ..base.errors import BadInputError, UNet3DSegmentError
from ..base.options import Option, OptionGroup

T = TypeVar("T", bound=OptionGroup)


class UsageError(BadInputError):
    """Bad command-line syntax or option value (exit code 3); the message is one line with the fix."""


_ONE_LINE_ERRORS: contextvars.ContextVar[bool] = contextvars.ContextVar("one_line_usage_errors", default=False)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are :class:`UsageError` (no usage block, no exit 2) while
    :func:`one_line_usage_errors` is in effect, as in ``main``; elsewhere (a parser used on its own)
    argparse's own behaviour.

    Sub-command parsers inherit the class (``add_subparsers`` makes them of the parent's type), so
    every syntax error of every command becomes one line naming the problem and where help is.
    ``--help`` and ``--version`` still print and exit 0.
    """

    def error(self, message: str):  # type: ignore[override]
        if not _ONE_LINE_ERRORS.get():
            super().error(message)
        raise UsageError(f"{' '.join(str(message).split())}; see '{self.prog} --help'")


@contextlib.contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """Within: :class:`OneLineParser` errors raise :class:`UsageError` (the command line reports it)."""
    token = _ONE_LINE_ERRORS.set(True)
    try:
        yield
    finally:
        _ONE_LINE_ERRORS.reset(token)


def progress_asked(argv: Iterable[str]) -> Optional[str]:
    """The ``--progress`` value in raw arguments (for reporting an error before they are parsed)."""
    items = list(argv)
    for index, item in enumerate(items):
        if item.startswith("--progress="):
            return item.split("=", 1)[1]
        if item == "--progress" and index + 1 < len(items):
            return items[index + 1]
    return None


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
        # A switch that is on by default: its --no- flag turns the described behaviour off.
        off = declared.default is True and declared.cli_flag not in declared.help
        kwargs["help"] = f"turn off: {declared.help}" if off else declared.help
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
