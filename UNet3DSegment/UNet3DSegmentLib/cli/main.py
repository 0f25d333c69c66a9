"""``unet3d-segment``: the command line of the engine.

Each sub-command lives in its own ``cli_<name>.py`` module with ``add_parser(subparsers)`` and
``run(args) -> int``; this module only dispatches, turns the engine's error kinds into one clear line
on stderr plus an exit code, and turns SIGTERM / Ctrl+C into a cancel. Heavy imports (TensorFlow)
happen inside ``run``, so ``--help`` is instant.

Before ``run(args)`` is called, ``args.cancel`` holds a ``threading.Event`` that SIGTERM sets and
``args.reporter`` the progress callback chosen by ``--progress`` (``None`` for "none").
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import traceback
import warnings
from typing import Optional, Sequence

from .. import __version__
from ..base.errors import (
    EXIT_CANCELLED,
    EXIT_INTERNAL,
    CancelledError,
    OutOfMemoryError,
    UNet3DSegmentError,
    is_out_of_memory,
)
from .arguments import OneLineParser, UsageError, one_line_usage_errors, progress_asked
from .terminal import make_reporter

PROG = "unet3d-segment"
COMMAND_MODULES = ["segment", "serve", "train", "demo", "web", "estimate", "batch"]


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every sub-command registered."""
    parser = OneLineParser(
        prog=PROG,
        description="Segment medical volumes with a Keras 3D U-Net (sliding-window inference).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_parser(subparsers)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def _report_error(args: argparse.Namespace, kind: str, message: str, exit_code: int) -> int:
    message = _one_line(message)
    reporter = getattr(args, "reporter", None)
    if reporter is not None and getattr(args, "progress", None) == "json":
        reporter({"stage": "error", "done": 0, "total": 0, "seconds": 0.0, "kind": kind,
                  "message": message, "exit_code": exit_code})
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return exit_code


def _install_sigterm(cancel: threading.Event) -> None:
    """SIGTERM sets the cancel event, so the run stops between batches and cleans up."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: cancel.set())
    except (ValueError, OSError):  # not allowed here (e.g. embedded interpreter)
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the process exit code (see errors.py)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's C++ chatter off stderr
    parser = build_parser()
    try:
        with one_line_usage_errors():
            args = parser.parse_args(argv)
    except UsageError as error:  # one line and exit 3, plus the JSON error event when JSON was asked
        raw = list(sys.argv[1:] if argv is None else argv)
        mode = progress_asked(raw)
        failed = argparse.Namespace(progress=mode, reporter=make_reporter("json") if mode == "json" else None)
        return _report_error(failed, error.kind, str(error), error.exit_code)
    args.cancel = threading.Event()
    args.reporter = make_reporter(getattr(args, "progress", "none"))
    _install_sigterm(args.cancel)
    try:
        with warnings.catch_warnings():  # numpy's RuntimeWarnings (overflow, invalid value) are no
            warnings.simplefilter("ignore", RuntimeWarning)  # lines for stderr: the engine says what is wrong
            return int(args.run(args) or 0)
    except UNet3DSegmentError as error:
        if args.debug:
            traceback.print_exc()
        return _report_error(args, error.kind, str(error), error.exit_code)
    except KeyboardInterrupt:
        return _report_error(args, CancelledError.kind, "interrupted; nothing was written", EXIT_CANCELLED)
    except Exception as error:  # noqa: BLE001 - last line of defence: one line, not a stack trace
        if args.debug:
            traceback.print_exc()
        if is_out_of_memory(error):
            from ..runtime.fallback import out_of_memory_advice
            from ..runtime.state import device_in_effect

            return _report_error(
                args,
                OutOfMemoryError.kind,
                out_of_memory_advice(device_in_effect(), f"({type(error).__name__})"),
                OutOfMemoryError.exit_code,
            )
        return _report_error(
            args,
            "internal",
            f"unexpected {type(error).__name__}: {error} (run with --debug for the traceback and report it)",
            EXIT_INTERNAL,
        )


if __name__ == "__main__":
    sys.exit(main())
