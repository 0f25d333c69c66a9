"""Run the engine's command line as a child process and follow it without blocking.

The Slicer module never runs TensorFlow in Slicer's own process: a crash, a GPU driver problem or a
memory blow-up must not take the application down, and the user must be able to cancel at any time.
``EngineProcess`` starts ``<python> -m UNet3DSegmentLib ...`` in its own process group, reads its
JSON-lines progress (docs/ARCHITECTURE.md) on a thread into a queue that the caller drains with
``poll()`` from its own thread (Slicer: a QTimer; headless code: a loop), collects stderr, ends the
whole process tree on ``cancel()``, and turns the exit status into one of the engine's error kinds
with the child's own one-line message.

In Slicer the command starts with ``PythonSlicer``, a CTK AppLauncher that runs ``python-real`` as
its own child in the same process group, with inherited stdout/stderr. Two consequences shape this
module: (1) when python-real is killed (typically by the kernel's out-of-memory killer) the launcher
only prints ``error: [.../python-real] exit abnormally - Report the problem.`` and exits 1, so that
line is read as "killed"; (2) the launcher dies at SIGTERM at once, so after a cancel request the
SIGKILL waits for the whole process group (not only our direct child) to be gone, or for the grace
period to end, and python-real gets its time to clean up and exit 5.

No ``slicer`` and no ``qt`` here: the same class serves the Slicer module, tests and scripts.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Optional, Sequence, Union

from ..base.options import SegmentOptions
from ..base.errors import (
    EXIT_BAD_INPUT,
    EXIT_BAD_MODEL,
    EXIT_CANCELLED,
    EXIT_OK,
    EXIT_OUT_OF_MEMORY,
    BadInputError,
    BadModelError,
    CancelledError,
    OutOfMemoryError,
    UNet3DSegmentError,
)

PathLike = Union[str, Path]
Event = dict[str, Any]

ENGINE_MODULE = "UNet3DSegmentLib"
MODULE_DIR = Path(__file__).resolve().parents[2]  # the folder that holds UNet3DSegmentLib/
STDERR_LINES_KEPT = 200
DEFAULT_GRACE_SECONDS = 5.0
KILLED_PREFIX = "the engine was killed (most likely out of memory): "
KILLED_REMEDY = "try a smaller batch size, the CPU device, or a smaller overlap or volume"
# What a CTK launcher (PythonSlicer) prints on stderr, then exits 1, when its child died of a signal.
_LAUNCHER_CRASH_LINE = re.compile(r"^error: \[(?P<path>.*)\] exit abnormally\b")

_ERRORS_BY_EXIT_CODE: dict[int, type[UNet3DSegmentError]] = {
    EXIT_BAD_INPUT: BadInputError,
    EXIT_BAD_MODEL: BadModelError,
    EXIT_CANCELLED: CancelledError,
    EXIT_OUT_OF_MEMORY: OutOfMemoryError,
}


def segment_command(
    python_executable: PathLike,
    inputs: Sequence[PathLike],
    output: PathLike,
    model: Optional[PathLike] = None,
    options: SegmentOptions = SegmentOptions(),
    extra_arguments: Sequence[str] = (),
) -> list[str]:
    """The argument list that runs ``segment`` with JSON-lines progress on stdout.

    Only options that differ from their declared defaults are written (``SegmentOptions.to_argv``), so
    the engine decides the rest; ``extra_arguments`` are appended as given.
    """
    if not inputs:
        raise BadInputError("no input volume given; pass one volume per model channel")
    command = [str(python_executable), "-m", ENGINE_MODULE, "segment"]
    command += [str(p) for p in inputs]
    command += ["-o", str(output)]
    if model is not None:
        command += ["--model", str(model)]
    return command + options.to_argv() + [str(a) for a in extra_arguments] + ["--progress", "json"]


def engine_environment(
    base: Optional[Mapping[str, str]] = None, module_dir: PathLike = MODULE_DIR
) -> dict[str, str]:
    """Environment for the child: ``base`` (default: ours) with the engine importable and UTF-8 I/O."""
    env = dict(os.environ if base is None else base)
    paths = [str(module_dir)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def error_for_exit(
    returncode: Optional[int],
    last_error: Optional[Event] = None,
    stderr_tail: Sequence[str] = (),
    cancelled: bool = False,
) -> Optional[UNet3DSegmentError]:
    """The engine error kind for a finished child, with one clear line; ``None`` on success.

    The child's last ``error`` event gives the message; without one, the last stderr line does.
    A child ended by a signal (negative ``returncode``), or a launcher that exited 1 after reporting
    that its own child "exit abnormally", is "cancelled" when we asked for it, and otherwise "killed
    (most likely out of memory)" with the signal or the launcher's report, the last thing the engine
    said, and the remedy, on one line.
    """
    if returncode == EXIT_OK and not cancelled:
        return None
    if cancelled or returncode == EXIT_CANCELLED:
        return CancelledError("segmentation cancelled; nothing was added to the scene")
    launcher_crash = None
    if returncode == 1:
        launcher_crash = next((m for m in map(_LAUNCHER_CRASH_LINE.match, reversed(stderr_tail)) if m), None)
    message = ""
    if last_error is not None:
        message = _one_line(last_error.get("message", ""))
    if not message:
        message = next((_one_line(line) for line in reversed(stderr_tail)
                        if line.strip() and not _LAUNCHER_CRASH_LINE.match(line)), "")
    if (returncode is not None and returncode < 0) or launcher_crash is not None:
        if launcher_crash is not None:
            name = Path(launcher_crash["path"].strip()).name or "the Python interpreter"
            detail = f"{name} exited abnormally (reported by the Python launcher)"
        else:
            detail = f"the engine process was ended by {_signal_name(-int(returncode or 0))}"
        if message:
            detail += f"; its last message: {message.rstrip('.')}"
        return UNet3DSegmentError(f"{KILLED_PREFIX}{detail}; {KILLED_REMEDY}")
    kind = _ERRORS_BY_EXIT_CODE.get(int(returncode or 0), UNet3DSegmentError)
    if not message:
        message = f"engine failed with exit code {returncode} and no message; run it in a terminal to see why"
    error = kind(message)
    if kind is UNet3DSegmentError:
        error.exit_code = int(returncode) if returncode is not None else error.exit_code
    return error


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def start_child(command: Sequence[Any], env: Optional[Mapping[str, str]] = None, cwd: Optional[PathLike] = None,
                stdin: Any = subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``command`` in a new process group (session on POSIX), text stdout/stderr piped.

    A missing or unusable interpreter is a ``BadInputError`` naming it and what to choose instead.
    """
    kwargs: dict[str, Any] = {}
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
    else:
        kwargs["start_new_session"] = True
    try:
        return subprocess.Popen(
            [str(c) for c in command],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
            cwd=None if cwd is None else str(cwd),
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )
    except FileNotFoundError as error:
        raise BadInputError(
            f"Python executable {command[0]} not found; choose an existing interpreter "
            "(Advanced > Python environment) or leave it empty to use Slicer's own"
        ) from error
    except OSError as error:
        raise BadInputError(f"cannot start the engine with {command[0]} ({error}); check that it is a Python "
                            "executable") from error


def start_readers(popen: subprocess.Popen, on_stdout: Callable[[str], None],
                  on_stderr: Callable[[str], None]) -> list[threading.Thread]:
    """One daemon thread per output pipe of ``popen``, handing each line to its handler until EOF."""
    def read(stream: IO[str], handle: Callable[[str], None]) -> None:
        for line in iter(stream.readline, ""):
            handle(line)
        stream.close()

    readers = [threading.Thread(target=read, args=(popen.stdout, on_stdout), daemon=True),
               threading.Thread(target=read, args=(popen.stderr, on_stderr), daemon=True)]
    for reader in readers:
        reader.start()
    return readers


class ProgressEvents:
    """The progress events of one run: a queue that ``poll()`` drains, and the last, error and done events.

    Shared by a run in a child of its own (``EngineProcess``) and a request on the warm engine
    (``warm_engine.WarmRequest``); ``_escalate`` is their hook for a pending cancel.
    """

    def __init__(self) -> None:
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.last_event: Optional[Event] = None
        self.last_error: Optional[Event] = None
        self.done_event: Optional[Event] = None

    def _record(self, event: Event) -> None:
        """Keep ``event`` (from a reader thread) for ``poll()``; remember an error or done event."""
        with self._lock:
            self.last_event = event
            if event.get("stage") == "error":
                self.last_error = event
            elif event.get("stage") == "done":
                self.done_event = event
        self._events.put(event)

    def _escalate(self) -> None:
        """After a cancel request: the next step of ending the child, if due (never blocks)."""

    @property
    def output(self) -> Optional[Path]:
        """The output path the child reported in its ``done`` event."""
        if self.done_event and self.done_event.get("output"):
            return Path(self.done_event["output"])
        return None

    def poll(self) -> list[Event]:
        """Progress events received since the last call, oldest first; never blocks."""
        self._escalate()
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events


class EngineProcess(ProgressEvents):
    """One running engine child: progress events in, cancel out, error kind at the end.

    Use ``EngineProcess.start(command, env=...)``; then call ``poll()`` regularly (it never blocks)
    until ``finished``; ``wait()`` blocks; ``error()`` gives the failure, if any, as an exception.
    """

    def __init__(self, popen: subprocess.Popen, command: Sequence[str]) -> None:
        ProgressEvents.__init__(self)
        self._popen = popen
        self.command = list(command)
        self._stderr: collections.deque = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._stdout_other: collections.deque = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._cancelled = False
        self._kill_deadline: Optional[float] = None
        self._group_killed = False  # after a cancel request: SIGKILL sent, or the whole group was gone
        self._readers = start_readers(popen, self._on_stdout, lambda line: self._stderr.append(line.rstrip("\n")))

    @classmethod
    def start(
        cls,
        command: Sequence[str],
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[PathLike] = None,
    ) -> EngineProcess:
        """Start ``command`` in a new process group (session on POSIX), stdout/stderr piped."""
        return cls(start_child(command, env, cwd), command)

    # --- reading (worker threads) -------------------------------------------------------------
    def _on_stdout(self, line: str) -> None:
        event = _parse_event(line)
        if event is not None:
            self._record(event)
        elif line.strip():
            self._stdout_other.append(line.rstrip("\n"))

    # --- state ----------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> Optional[int]:
        """Exit status once the child has ended (negative: killed by that signal on POSIX)."""
        return self._popen.poll()

    @property
    def finished(self) -> bool:
        """True once the child has exited and all its output has been read; never blocks.

        The output ends when every process holding our pipes has exited, python-real behind a
        launcher included. After a cancel request, also not before the process group is gone or
        has been sent SIGKILL (asking sends it when its time has come).
        """
        self._escalate()
        return (
            self._popen.poll() is not None
            and not any(r.is_alive() for r in self._readers)
            and not self._escalation_pending()
        )

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def stderr_tail(self) -> list[str]:
        """The last lines the child wrote on stderr (and non-JSON lines of stdout)."""
        return list(self._stdout_other) + list(self._stderr)

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until the child has ended and its output is read; the exit code, or None on timeout.

        After a cancel request this also waits until the child's whole process group is gone (a
        launcher may die at once while python-real still cleans up), and sends the group's SIGKILL
        when the grace period is over.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._escalate()
            pending = self._escalation_pending()
            if self._popen.poll() is not None and not pending:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            step = remaining
            if pending:  # look again soon: the group may end, or its grace period run out
                step = _GROUP_POLL_SECONDS if remaining is None else min(remaining, _GROUP_POLL_SECONDS)
                if self._kill_deadline is not None:
                    step = max(0.0, min(step, self._kill_deadline - time.monotonic()))
            if self._popen.poll() is None:
                try:
                    self._popen.wait(step)
                except subprocess.TimeoutExpired:
                    pass
            elif step:
                time.sleep(step)
        for reader in self._readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._popen.returncode

    def error(self) -> Optional[UNet3DSegmentError]:
        """After the end: the failure as an engine error kind, or None when the run succeeded."""
        if self._popen.poll() is None:
            return None
        with self._lock:
            last_error = self.last_error
        error = error_for_exit(self._popen.returncode, last_error, self.stderr_tail, self._cancelled)
        if error is None and self.output is None:
            return UNet3DSegmentError("engine exited without reporting its output; run it in a terminal to see why")
        return error

    # --- cancel ---------------------------------------------------------------------------------
    def request_cancel(self, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
        """Start ending the child and everything it started, without waiting (GUI thread safe).

        POSIX: SIGTERM to the process group now (the engine cleans up and exits 5); ``poll()``,
        ``finished`` and ``wait()`` send SIGKILL to the group once ``grace_seconds`` have passed,
        unless every process of the group has exited by then. Our direct child alone does not
        count: behind PythonSlicer the launcher dies at SIGTERM at once while python-real, in the
        same group, is still cleaning up. Windows: ``taskkill /T /F`` on the tree at once.
        """
        running = self._popen.poll() is None
        if not running and os.name != "nt" and any(r.is_alive() for r in self._readers):
            running = _group_alive(self._popen.pid)  # e.g. python-real still at work behind its launcher
        if running:
            self._cancelled = True  # a run that already ended keeps its own result
        if self._kill_deadline is not None:
            return
        self._kill_deadline = time.monotonic() + grace_seconds
        if os.name == "nt":
            self._cancel_windows()
        elif running:
            _kill_group(self._popen.pid, signal.SIGTERM)
        else:
            self._group_killed = True  # the run had ended: nothing to end (its group id may be reused)

    def cancel(self, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
        """End the child's whole process tree and return once it is gone (``request_cancel`` + wait)."""
        self.request_cancel(grace_seconds)
        self.wait(timeout=grace_seconds + 5.0)

    def _escalation_pending(self) -> bool:
        """After a cancel request (POSIX): the group is neither known to be gone nor sent SIGKILL yet."""
        return self._kill_deadline is not None and not self._group_killed and os.name != "nt"

    def _escalate(self) -> None:
        """After a cancel request: done once the whole group is gone; SIGKILL it when the grace time is over.

        Never blocks. The group is the child's (start_new_session: the child leads it); it stays
        ours while the child is not reaped, or while any member lives, so its id is not reused.
        """
        if not self._escalation_pending():
            return
        self._popen.poll()  # reap the direct child first: a zombie still counts as a group member
        if not _group_alive(self._popen.pid):
            self._group_killed = True  # everyone exited within the grace period: nothing to kill
        elif time.monotonic() >= self._kill_deadline:  # type: ignore[operator]
            # Members that ignore SIGTERM, or are slow to leave, go now.
            _kill_group(self._popen.pid, signal.SIGKILL)
            self._group_killed = True

    def _cancel_windows(self) -> None:
        if self._popen.poll() is None:
            subprocess.run(
                ["taskkill", "/PID", str(self._popen.pid), "/T", "/F"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
                check=False,
            )


def _kill_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


_GROUP_POLL_SECONDS = 0.05
_PROC = Path("/proc")


def _group_alive(group: int) -> bool:
    """Whether any process of ``group`` still runs (POSIX; zombies do not count where /proc shows them).

    ``killpg(group, 0)`` also succeeds while the only members left are zombies, e.g. a python-real
    orphaned by its launcher that nobody has reaped yet (a container's PID 1 may never do it), so on
    Linux the members' states are read from /proc. Unknown answers count as alive: the grace
    period still bounds the wait.
    """
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError included: someone is there
        return True
    try:
        if int((_PROC / "self" / "stat").read_bytes().split(None, 1)[0]) != os.getpid():
            return True  # not our PID namespace's /proc: cannot tell zombies from the living
        entries = sorted((int(e) for e in os.listdir(_PROC) if e.isdigit()), reverse=True)  # newest first
    except (OSError, ValueError, IndexError):
        return True  # no /proc (macOS): a zombie counts as alive until it is reaped
    for entry in entries:
        try:
            stat = (_PROC / str(entry) / "stat").read_bytes()
            fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
            if int(fields[2]) == group and fields[0] not in (b"Z", b"X"):
                return True
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
    return False


def _parse_event(line: str) -> Optional[Event]:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if isinstance(event, dict) and isinstance(event.get("stage"), str):
        return event
    return None


def default_python_executable() -> Path:
    """The interpreter running us; Slicer passes its PythonSlicer instead."""
    return Path(sys.executable)


def slicer_python(slicer_home: PathLike) -> Path:
    """Slicer's ``PythonSlicer`` launcher (on PATH, else in ``<slicer_home>/bin``), else the running interpreter."""
    import shutil

    found = shutil.which("PythonSlicer")
    if found:
        return Path(found)
    candidate = Path(slicer_home) / "bin" / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    return candidate if candidate.exists() else Path(sys.executable)
