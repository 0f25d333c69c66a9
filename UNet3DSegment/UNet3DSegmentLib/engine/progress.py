"""Progress events and the reporters that show them.

The engine reports progress through a plain callback taking one event dict, so it never prints.
The command line picks a reporter: JSON lines on stdout (this module: read by the Slicer module and
the web app, see docs/ARCHITECTURE.md), a terminal progress bar on stderr (``cli/terminal.py``), or
nothing.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Callable, Optional, TextIO

ProgressEvent = dict[str, Any]
ProgressCallback = Callable[[ProgressEvent], None]

STAGES = ("load", "preprocess", "inference", "postprocess", "write", "done", "warning", "error", "train", "validate")


class ProgressEmitter:
    """Builds events with a common clock and forwards them to an optional callback.

    Events may come from the sliding window's model thread (out-of-memory warnings) as well as the
    main thread; a lock keeps the callback's lines whole and in order.
    """

    def __init__(self, callback: Optional[ProgressCallback] = None) -> None:
        self._callback = callback
        self._start = time.perf_counter()
        self._lock = threading.Lock()

    @property
    def seconds(self) -> float:
        """Seconds since the emitter was created (the run's start)."""
        return time.perf_counter() - self._start

    def emit(self, stage: str, done: int = 0, total: int = 0, message: str = "", **extra: Any) -> None:
        """Send one event; ``stage`` is one of ``STAGES``."""
        if self._callback is None:
            return
        event: ProgressEvent = {
            "stage": stage,
            "done": int(done),
            "total": int(total),
            "seconds": round(self.seconds, 3),
            "message": message,
        }
        event.update(extra)
        with self._lock:
            self._callback(event)

    def patches(self, done: int, total: int) -> None:
        """Adapter for ``sliding_window_predict``'s ``progress(done, total)``."""
        self.emit("inference", done, total, f"patch {done}/{total}")


class JsonLinesReporter:
    """Writes each event as one JSON object per line (flushed at once, for a reading parent)."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self._stream = stream

    def __call__(self, event: ProgressEvent) -> None:
        self._stream.write(json.dumps(event, ensure_ascii=False) + "\n")
        self._stream.flush()
