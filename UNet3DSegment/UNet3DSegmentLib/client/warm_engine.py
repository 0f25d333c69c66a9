"""Keep one engine child (``unet3d-segment serve``) alive between runs, with its model loaded.

A cold run (``engine_process.EngineProcess``) pays the framework's start-up and the model load every
time. ``WarmEngine`` owns one ``serve`` child (docs/ARCHITECTURE.md, "Warm engine") for one key:
(Python executable, model path with the model's and card's modification stamp, runtime options,
environment). ``run(...)`` sends one request and returns a ``WarmRequest``, which has the interface
``SegmentationJob`` uses from ``EngineProcess`` (``poll``, ``finished``, ``error()``, ``output``,
``request_cancel``, ``cancel``, ``wait``, ``returncode``, ``stderr_tail``, ``pid``).

- Another key (model, model file changed, runtime options, interpreter, environment): the old child
  is stopped and a new one started.
- Cancel ends the child's process group (SIGTERM, grace, SIGKILL): the request is cancelled and the
  next run starts a fresh child. A child that dies (crash, out-of-memory kill) fails the running
  request with the engine's error; the next run starts a new one.
- The child exits on its own after ``idle_timeout`` seconds without a request; a child past (or
  near) its idle time counts as cold and is replaced. ``stop()`` ends it; so does the garbage
  collection of the ``WarmEngine`` and the end of the interpreter.

No ``slicer``, no ``qt``, no ``cli`` here.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import signal
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..base.errors import BadInputError, UNet3DSegmentError
from ..base.options import Option, SegmentOptions
from .engine_process import (
    DEFAULT_GRACE_SECONDS as GRACE_SECONDS,
    ENGINE_MODULE,
    STDERR_LINES_KEPT,
    Event,
    PathLike,
    ProgressEvents,
    _kill_group,
    _parse_event,
    engine_environment,
    error_for_exit,
    start_child,
    start_readers,
)

DEFAULT_IDLE_TIMEOUT = 600.0
RUNTIME = "runtime"
MODEL_LOADING_OPTIONS = ("trust_model",)  # not runtime options, but the model is loaded under them
_SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)  # Windows has no SIGKILL (and ends trees with taskkill)


def model_stamp(model: PathLike) -> tuple:
    """What changes when the model or its card changes on disk: (path, mtime_ns, size) of each that exists.

    A SavedModel folder counts with its ``saved_model.pb`` and ``variables/`` index.
    """
    from ..engine.card import card_path_for_model

    model = Path(model)
    parts = [model, card_path_for_model(model)]
    if model.is_dir():
        parts += [model / "saved_model.pb", model / "variables" / "variables.index"]
    stamp = []
    for path in parts:
        try:
            info = path.stat()
        except OSError:
            continue
        stamp.append((str(path), info.st_mtime_ns, info.st_size))
    return tuple(stamp)


def server_options() -> list[Option]:
    """The ``SegmentOptions`` a warm child is started with, and keyed by: the "runtime" group (device,
    precision, backend, ...) and those that change how the model is loaded (``trust_model``)."""
    chosen = SegmentOptions.options(group=RUNTIME)
    return chosen + [SegmentOptions.OPTIONS[n] for n in MODEL_LOADING_OPTIONS
                     if n in SegmentOptions.OPTIONS and SegmentOptions.OPTIONS[n] not in chosen]


def split_runtime_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``segment`` flags split into (those of ``server_options()``, the rest)."""
    flags = {o.cli_flag: o for o in server_options()}
    runtime: list[str] = []
    rest: list[str] = []
    tokens = [str(a) for a in argv]
    index = 0
    while index < len(tokens):
        token = tokens[index]
        declared = flags.get(token.split("=", 1)[0])
        if declared is None:
            rest.append(token)
            index += 1
        elif declared.kind is bool or "=" in token:
            runtime.append(token)
            index += 1
        else:
            runtime += tokens[index:index + 2]
            index += 2
    return runtime, rest


@dataclass(frozen=True)
class EngineKey:
    """What a warm child is started for; any change means another child."""

    python: str
    model: str
    stamp: tuple
    runtime: tuple
    environment: tuple


class _Server:
    """One ``serve`` child: reads its events, routes each to the request with that id."""

    def __init__(self, popen: subprocess.Popen, key: EngineKey, idle_timeout: float) -> None:
        self.popen = popen
        self.key = key
        self.idle_timeout = idle_timeout
        self.requests: dict[str, WarmRequest] = {}
        self.current: Optional[WarmRequest] = None
        self.ready_event: Optional[Event] = None
        self.last_error: Optional[Event] = None  # an error line without request id (start-up failure)
        self.stopped_event: Optional[Event] = None
        self.retired = False  # cancelled or stopping: never given another request
        self.idle_since = time.monotonic()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._output: collections.deque = collections.deque(maxlen=STDERR_LINES_KEPT)  # (number, line)
        self._lines = itertools.count()
        self._readers = start_readers(popen, self._on_stdout, lambda line: self._keep_line(line.rstrip("\n")))

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exited(self) -> bool:
        """The child has ended and everything it wrote has been read."""
        return self.popen.poll() is not None and not any(r.is_alive() for r in self._readers)

    @property
    def stderr_tail(self) -> list[str]:
        """The child's last stderr lines (and non-JSON stdout lines), start-up included."""
        return [line for _, line in list(self._output)]

    @property
    def lines_written(self) -> int:
        """How many output lines the child has written so far (a request's own lines come after)."""
        with self._lock:
            return self._output[-1][0] + 1 if self._output else 0

    def output_since(self, first: int) -> list[str]:
        return [line for number, line in list(self._output) if number >= first]

    def _keep_line(self, line: str) -> None:
        with self._lock:
            self._output.append((next(self._lines), line))

    def usable(self, key: EngineKey) -> bool:
        """Alive, for this key, not busy, not cancelled, and not at the end of its idle time."""
        if self.retired or self.popen.poll() is not None or key != self.key:
            return False
        if self.current is not None and not self.current._answered:
            return False
        if self.idle_timeout > 0:
            margin = min(5.0, self.idle_timeout / 10.0)
            if time.monotonic() - self.idle_since > self.idle_timeout - margin:
                return False
        return True

    def submit(self, argv: Sequence[str]) -> "WarmRequest":
        request_id = f"r{next(self._ids)}"
        request = WarmRequest(self, request_id, argv)
        with self._lock:
            self.requests[request_id] = request
            self.current = request
        line = json.dumps({"id": request_id, "argv": [str(a) for a in argv]}) + "\n"
        try:
            self.popen.stdin.write(line)
            self.popen.stdin.flush()
        except (OSError, ValueError):  # the child is gone (broken pipe): the request fails with its exit
            self.retired = True
        return request

    def _on_stdout(self, line: str) -> None:
        event = _parse_event(line)
        if event is None:
            if line.strip():
                self._keep_line(line.rstrip("\n"))
            return
        with self._lock:
            request = self.requests.get(str(event.get("id"))) if event.get("id") is not None else None
            current = self.current
        if request is None and event.get("stage") == "error" and current is not None and not current._answered:
            request = current  # an error the child could not tie to a request (it failed reading it)
        if request is not None:
            request._receive(event)
            if request._answered:
                self.idle_since = time.monotonic()
                with self._lock:
                    self.requests.pop(request.request_id, None)
        elif event.get("stage") == "ready":
            self.ready_event = event
            self.idle_since = time.monotonic()
        elif event.get("stage") == "stopped":
            self.stopped_event = event
        elif event.get("stage") == "error":
            self.last_error = event

    def signal_group(self, sig: int) -> None:
        if os.name == "nt":
            if self.popen.poll() is None:
                subprocess.run(["taskkill", "/PID", str(self.popen.pid), "/T", "/F"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
                               check=False)
        else:
            _kill_group(self.popen.pid, sig)  # start_new_session: the child leads its group

    def wait_gone(self, timeout: float) -> bool:
        """Wait until the child has exited and its output is closed (every process holding it gone)."""
        deadline = time.monotonic() + timeout
        while not self.exited:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def begin_stop(self) -> None:
        """Ask the child to end, without waiting: stdin closed, SIGTERM to its group."""
        self.retired = True
        try:
            self.popen.stdin.close()
        except (OSError, ValueError):
            pass
        if not self.exited:
            self.signal_group(signal.SIGTERM)

    def stop(self, grace_seconds: float = GRACE_SECONDS) -> None:
        """End the child: ``begin_stop``, then SIGKILL to what is left of its group after ``grace_seconds``.

        Behind a launcher (Slicer's PythonSlicer) the launcher dies at SIGTERM at once while the real
        interpreter, in the same group, still exits: the wait is for the output to close, not for
        our direct child.
        """
        self.begin_stop()
        if not self.wait_gone(grace_seconds):
            self.signal_group(_SIGKILL)
            self.wait_gone(5.0)
        try:
            self.popen.wait(1.0)
        except subprocess.TimeoutExpired:
            pass


class WarmRequest(ProgressEvents):
    """One segmentation run on a warm child; the interface ``SegmentationJob`` uses from ``EngineProcess``."""

    def __init__(self, server: _Server, request_id: str, argv: Sequence[str]) -> None:
        ProgressEvents.__init__(self)
        self._server = server
        self._first_line = server.lines_written
        self.request_id = request_id
        self.command = list(argv)
        self._answered = False  # its done or error line arrived
        self._cancelled = False
        self._kill_deadline: Optional[float] = None
        self._group_killed = False

    def _receive(self, event: Event) -> None:
        self._record(event)
        if event.get("stage") in ("error", "done"):
            self._answered = True

    # --- state ------------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """The warm child's process id (the same for every request it serves)."""
        return self._server.pid

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def finished(self) -> bool:
        """True once the request is answered (after a cancel: once the child is gone), or the child died."""
        if self._cancelled or not self._answered:
            self._escalate()
            return self._server.exited
        return True

    @property
    def returncode(self) -> Optional[int]:
        """0 when done, the ``segment`` exit code of its error, or the child's exit status if it died first."""
        with self._lock:
            if self.done_event is not None:
                return 0
            if self.last_error is not None:
                return int(self.last_error.get("exit_code", 1))
        return self._server.popen.poll()

    @property
    def stderr_tail(self) -> list[str]:
        """What the child wrote since this request was sent (all it wrote, if nothing since: a crash at start)."""
        return self._server.output_since(self._first_line) or self._server.stderr_tail

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until ``finished``; the request's exit code, or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self._escalate()
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
        self._escalate()
        return self.returncode

    def error(self) -> Optional[UNet3DSegmentError]:
        """Once finished: the failure as an engine error kind, or None when the request succeeded."""
        if not self.finished:
            return None
        if self._cancelled:
            return error_for_exit(self.returncode, self.last_error, self.stderr_tail, cancelled=True)
        with self._lock:
            done, last_error = self.done_event, self.last_error
        if done is not None:
            if self.output is None:
                return UNet3DSegmentError("engine reported done without its output; run it in a terminal to see why")
            return None
        if last_error is not None:
            return error_for_exit(int(last_error.get("exit_code", 1)), last_error, self.stderr_tail)
        server = self._server
        code = server.popen.poll()
        error = error_for_exit(code, server.last_error, server.stderr_tail)
        if error is None:  # exit 0 without answering (idle timeout, end of input)
            reason = (server.stopped_event or {}).get("message", "")
            error = UNet3DSegmentError("the warm engine stopped before answering"
                                       f"{' (' + reason + ')' if reason else ''}; run the segmentation again")
        return error

    # --- cancel -----------------------------------------------------------------------------------
    def request_cancel(self, grace_seconds: float = GRACE_SECONDS) -> None:
        """End the warm child's process group without waiting: SIGTERM now, SIGKILL after ``grace_seconds``.

        A request already answered keeps its own result and the child lives on. The next run starts a
        fresh child.
        """
        if self._answered or self._server.exited:
            return
        self._cancelled = True
        self._server.retired = True
        if self._kill_deadline is not None:
            return
        self._kill_deadline = time.monotonic() + grace_seconds
        self._server.signal_group(signal.SIGTERM)

    def cancel(self, grace_seconds: float = GRACE_SECONDS) -> None:
        """``request_cancel`` and wait until the child is gone."""
        self.request_cancel(grace_seconds)
        self.wait(timeout=grace_seconds + 5.0)

    def _escalate(self) -> None:
        """After a cancel request: nothing to do once the child's output has closed (its group exited);
        SIGKILL to the group when the grace time is over. Never blocks."""
        if self._kill_deadline is None or self._group_killed:
            return
        if self._server.exited:
            self._group_killed = True
        elif time.monotonic() >= self._kill_deadline:
            self._server.signal_group(_SIGKILL)
            self._group_killed = True


class WarmEngine:
    """At most one warm ``serve`` child, started on the first ``run`` and kept for the next ones."""

    def __init__(self, idle_timeout: float = DEFAULT_IDLE_TIMEOUT, grace_seconds: float = GRACE_SECONDS) -> None:
        self.idle_timeout = float(idle_timeout)
        self.grace_seconds = grace_seconds
        self._box: dict[str, Optional[_Server]] = {"server": None}
        self._finalizer = weakref.finalize(self, _stop_box, self._box)  # also runs at interpreter exit

    @property
    def pid(self) -> Optional[int]:
        """The running child's process id, or None."""
        server = self._box["server"]
        return server.pid if server is not None and server.popen.poll() is None else None

    @property
    def busy(self) -> bool:
        """A request is running on the child."""
        server = self._box["server"]
        return bool(server is not None and server.popen.poll() is None and server.current is not None
                    and not server.current._answered and not server.retired)

    @property
    def key(self) -> Optional[EngineKey]:
        server = self._box["server"]
        return server.key if server is not None else None

    @staticmethod
    def key_for(python_executable: PathLike, model: Path, runtime: Sequence[str],
                env: Mapping[str, str]) -> EngineKey:
        environment = tuple(sorted(env.items()))
        return EngineKey(str(python_executable), str(model), model_stamp(model), tuple(runtime), environment)

    def run(
        self,
        python_executable: PathLike,
        inputs: Sequence[PathLike],
        output: PathLike,
        model: Optional[PathLike] = None,
        options: SegmentOptions = SegmentOptions(),
        extra_arguments: Sequence[str] = (),
        env: Optional[Mapping[str, str]] = None,
    ) -> WarmRequest:
        """Segment ``inputs`` into ``output`` on the warm child (started, or replaced, when needed).

        The arguments are those of ``engine_process.segment_command``; ``env`` is the child's
        environment (default: ``engine_environment()``, ours with the engine importable). Raises
        ``BadInputError`` while another request runs.
        """
        if not inputs:
            raise BadInputError("no input volume given; pass one volume per model channel")
        if model is None:
            from ..engine.bundled_models import default_model_path

            model = default_model_path()
        model_path = Path(model).absolute()
        env = engine_environment() if env is None else dict(env)
        flags = options.to_argv() + [str(a) for a in extra_arguments]
        runtime, _ = split_runtime_arguments(flags)
        key = self.key_for(python_executable, model_path, runtime, env)
        if self.busy:
            raise BadInputError("a segmentation is already running on the warm engine; wait for it or cancel it")
        server = self._box["server"]
        if server is None or not server.usable(key):
            self.stop(wait=False)  # the old child exits while the new one starts
            server = self._start(key, python_executable, model_path, runtime, env)
        argv = [str(Path(p).absolute()) for p in inputs] + ["-o", str(Path(output).absolute())]
        argv += ["--model", str(model_path)] + flags + ["--progress", "json"]
        return server.submit(argv)

    def _start(self, key: EngineKey, python_executable: PathLike, model: Path, runtime: Sequence[str],
               env: Mapping[str, str]) -> _Server:
        command = [str(python_executable), "-m", ENGINE_MODULE, "serve", "--model", str(model), *runtime,
                   "--idle-timeout", repr(self.idle_timeout), "--progress", "json"]
        popen = start_child(command, env, stdin=subprocess.PIPE)
        server = _Server(popen, key, self.idle_timeout)
        self._box["server"] = server
        return server

    def stop(self, grace_seconds: Optional[float] = None, wait: bool = True) -> None:
        """End the warm child (a running request fails as cancelled); the next ``run`` starts a new one.

        SIGTERM and the end of its input go at once; ``wait``: return once it is gone (SIGKILL after
        ``grace_seconds``), else a background thread waits and escalates (a GUI need not block on the
        child's own shut-down, about a second for TensorFlow).
        """
        server = self._box["server"]
        self._box["server"] = None
        if server is None:
            return
        current = server.current
        if current is not None and not current._answered and not server.exited:
            current._cancelled = True
        grace = self.grace_seconds if grace_seconds is None else grace_seconds
        server.begin_stop()
        if wait:
            server.stop(grace)
        else:
            threading.Thread(target=server.stop, args=(grace,), name="warm-engine-stop", daemon=True).start()


def _stop_box(box: dict) -> None:
    server = box.get("server")
    box["server"] = None
    if server is not None:
        server.stop(1.0)

