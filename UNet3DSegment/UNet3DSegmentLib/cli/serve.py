"""``unet3d-segment serve``: keep the runtime and one model loaded; segment on requests read from stdin.

The warm engine of the Slicer module (``client/warm_engine.py``) runs this as its child, so that a
second segmentation with the same model skips the framework's start-up and the model load. Protocol
(docs/ARCHITECTURE.md, "Warm engine"):

- started with ``--model M``, the runtime options (device, precision, backend, ...: the ``runtime``
  group of ``SegmentOptions``, and ``--trust-model``, which changes how the model loads),
  ``--idle-timeout SECONDS`` and ``--progress json``; it starts the
  runtime, loads the model, runs one batch of zeros to compile the forward pass and writes
  ``{"stage": "ready", ...}``;
- then reads one JSON object per line on stdin: ``{"id": "r1", "argv": [<segment arguments>]}``,
  where ``argv`` is what follows ``unet3d-segment segment`` (parsed by the same arguments, so checked
  the same way); each request gets the JSON-lines progress of ``segment`` with its ``"id"`` added,
  ending in one ``done`` or ``error`` line (the same error kinds and exit codes);
- a request for another model, a changed model file or other runtime options is answered with an
  ``error`` line with ``"restart": true`` (the client starts another server);
- end of stdin, ``--idle-timeout`` seconds without a request, or SIGTERM end the server with a
  ``{"stage": "stopped", "reason": ...}`` line and exit code 0; SIGTERM during a request cancels it
  (its ``error`` line, kind ``cancelled``) and the server exits with 5, as ``segment`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Optional

from ..base.errors import (
    EXIT_CANCELLED,
    EXIT_INTERNAL,
    BadInputError,
    CancelledError,
    OutOfMemoryError,
    UNet3DSegmentError,
    is_out_of_memory,
)
from ..base.options import JobOptions, SegmentOptions
from ..client.warm_engine import DEFAULT_IDLE_TIMEOUT, model_stamp, server_options
from .arguments import add_options, options_from_args, start_runtime
from .segment import add_segment_arguments, segment_from_args

PROG = "unet3d-segment"
POLL_SECONDS = 0.2  # how often the idle loop looks at SIGTERM and the idle timeout


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``serve``: ``--model``, the runtime options (from the schema), ``--idle-timeout``."""
    parser = subparsers.add_parser(
        "serve",
        help="keep a model loaded and segment on JSON requests read from stdin",
        description="Start the runtime, load MODEL once, then run one segmentation per JSON line read on "
        'stdin ({"id": ..., "argv": [segment arguments]}), writing JSON-lines progress with the request '
        "id on stdout. Ends at end of input, after --idle-timeout seconds without a request, or on SIGTERM.",
    )
    add_options(parser, JobOptions, only=["model"])
    add_options(parser, SegmentOptions, only=[o.name for o in server_options()])
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT, metavar="SECONDS",
                        help=f"exit after this many seconds without a request, 0: never (default "
                        f"{DEFAULT_IDLE_TIMEOUT:g})")
    add_options(parser, JobOptions, only=["progress"],
                progress={"choices": ["json"], "default": "json", "help": "progress as JSON lines on stdout "
                          "(the only mode of serve)"})
    parser.set_defaults(run=run)


class RequestError(BadInputError):
    """A request that cannot be run as given (bad JSON, bad arguments): bad input (3), as ``segment``'s usage errors."""


class _RequestParser(argparse.ArgumentParser):
    """The ``segment`` arguments; a bad one raises instead of printing usage and exiting the server."""

    def error(self, message: str):  # type: ignore[override]
        raise RequestError(f"segment: {message}")


def request_parser() -> argparse.ArgumentParser:
    parser = _RequestParser(prog=f"{PROG} segment", add_help=False)
    add_segment_arguments(parser)
    return parser


def describe_error(error: BaseException) -> tuple[str, str, int]:
    """``(kind, one-line message, exit code)`` as ``cli/main.py`` reports the same failure of ``segment``."""
    if isinstance(error, UNet3DSegmentError):
        return error.kind, _one_line(str(error)), error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return CancelledError.kind, "interrupted; nothing was written", EXIT_CANCELLED
    if is_out_of_memory(error):
        return (OutOfMemoryError.kind,
                f"out of memory ({type(error).__name__}); lower --batch-size, or use --device cpu",
                OutOfMemoryError.exit_code)
    return ("internal", _one_line(f"unexpected {type(error).__name__}: {error} (run with --debug for the traceback "
                                  "and report it)"), EXIT_INTERNAL)


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def _runtime_values(options: SegmentOptions) -> dict[str, Any]:
    """The values that fixed this server at its start: runtime options, and how the model was loaded."""
    return {o.name: getattr(options, o.name) for o in server_options()}


class Server:
    """The loaded model and what a request must match to run on it."""

    def __init__(self, args: argparse.Namespace, loaded: Any, options: SegmentOptions, model_path: Path,
                 stamp: tuple) -> None:
        self.args = args
        self.loaded = loaded
        self.options = options
        self.model_path = model_path
        self.stamp = stamp
        self.parser = request_parser()
        self.debug = bool(getattr(args, "debug", False))

    def emit(self, event: dict[str, Any]) -> None:
        self.args.reporter({"done": 0, "total": 0, "seconds": 0.0, "message": "", **event})

    def error(self, request_id: Any, error: BaseException, **extra: Any) -> int:
        """One ``error`` line for the request (and the line ``segment`` prints on stderr); the exit code."""
        kind, message, code = describe_error(error)
        if self.debug and not isinstance(error, UNet3DSegmentError):
            import traceback

            traceback.print_exception(error)
        self.emit({"stage": "error", "kind": kind, "message": message, "exit_code": code, "id": request_id, **extra})
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return code

    def handle(self, line: str) -> Optional[int]:
        """Run one request line; returns an exit code when the server must end (cancelled), else None."""
        request_id = None
        try:
            try:
                request = json.loads(line)
            except ValueError as error:
                raise RequestError(f"request is not JSON ({error}); send one JSON object per line: "
                                   '{"id": "...", "argv": [segment arguments]}') from None
            if not isinstance(request, dict):
                raise RequestError('request must be a JSON object {"id": "...", "argv": [segment arguments]}')
            request_id = request.get("id")
            argv = request.get("argv")
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise RequestError('request needs "argv": a list of strings, the arguments of segment')
            args = self.parser.parse_args(argv)
            mismatch = self.mismatch(args)
            if mismatch:
                self.error(request_id, BadInputError(mismatch), restart=True)
                return None
            args.cancel = self.args.cancel
            args.reporter = lambda event: self.args.reporter({**event, "id": request_id})
            segment_from_args(args, loaded=self.loaded)
        except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - each failure is one error line
            self.error(request_id, error)
            if isinstance(error, (CancelledError, KeyboardInterrupt)) or self.args.cancel.is_set():
                return EXIT_CANCELLED
        return None

    def mismatch(self, args: argparse.Namespace) -> str:
        """Why this server cannot run the request (another model, a changed model file, other runtime options)."""
        from ..engine.bundled_models import default_model_path

        wanted = Path(args.model) if args.model else default_model_path()
        if wanted.resolve() != self.model_path.resolve():
            return f"this server has model {self.model_path} loaded, not {wanted}; start a server for that model"
        if model_stamp(self.model_path) != self.stamp:
            return f"model {self.model_path} (or its card) changed since this server loaded it; start a new server"
        requested = _runtime_values(options_from_args(args, SegmentOptions))
        have = _runtime_values(self.options)
        differ = [f"{name}={requested[name]!r} (server: {have[name]!r})" for name in have
                  if requested[name] != have[name]]
        if differ:
            return f"this server runs other runtime options: {', '.join(differ)}; start a server with them"
        return ""


def _read_lines(stream: IO[str], lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)  # end of input


def _warm_up(loaded: Any) -> None:
    """One batch of zeros (the default batch size) through the forward pass, so that the first request
    finds it compiled, with the kernels for that batch shape already chosen."""
    import numpy as np

    batch = SegmentOptions().batch_size
    loaded.predict(np.zeros((batch, *loaded.patch_size, loaded.in_channels), dtype=np.float32))


def run(args: argparse.Namespace, stdin: Optional[IO[str]] = None,
        clock: Callable[[], float] = time.monotonic) -> int:
    """Load the model once, say ``ready``, then serve requests until end of input, idle timeout or SIGTERM."""
    from ..engine.bundled_models import default_model_path
    from ..engine.loading import load_model

    started = time.perf_counter()
    options = options_from_args(args, SegmentOptions)  # the runtime options; the rest is per request
    model_path = Path(args.model).expanduser() if args.model else default_model_path()
    stamp = model_stamp(model_path)
    device = start_runtime(options)
    if "trust_model" in SegmentOptions.OPTIONS:
        from ..engine.loading import trust_models

        trust_models(options.trust_model)  # --trust-model: a SavedModel skips the safety check
    loaded = load_model(model_path, precision=options.precision)
    _warm_up(loaded)
    server = Server(args, loaded, options, model_path, stamp)
    server.emit({"stage": "ready", "pid": os.getpid(), "model": str(model_path), "device": device,
                 "precision": loaded.precision, "seconds": round(time.perf_counter() - started, 3),
                 "message": f"model {model_path.name} loaded on {device} ({loaded.precision})"})

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(stdin or sys.stdin, lines), daemon=True).start()
    idle = float(args.idle_timeout or 0)
    last = clock()
    while True:
        if args.cancel.is_set():
            return _stopped(server, "terminated", "SIGTERM while idle")
        try:
            line = lines.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if idle > 0 and clock() - last >= idle:
                return _stopped(server, "idle-timeout", f"no request for {idle:g} s")
            continue
        if line is None:
            return _stopped(server, "end-of-input", "stdin closed")
        if not line.strip():
            continue
        code = server.handle(line)
        if code is not None:
            return code
        last = clock()


def _stopped(server: Server, reason: str, message: str) -> int:
    server.emit({"stage": "stopped", "reason": reason, "message": message})
    return 0
