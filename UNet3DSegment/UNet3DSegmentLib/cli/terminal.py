"""The terminal progress display of the command line (``--progress bar``), on stderr.

One bar for the long stages (sliding-window patches, training steps) and a plain line for every
other event with a message. The engine never prints: it sends events, and this is one of the
reporters the command line chooses between (``--progress bar|json|none``).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, TextIO

from ..engine.progress import JsonLinesReporter, ProgressCallback, ProgressEvent

BAR_STAGES = {
    "inference": lambda event: ("inference", f"{event['done']}/{event['total']} patches"),
    "train": lambda event: (event.get("message", "training"),
                            f"step {event['done']}/{event['total']}, loss {event.get('loss', 0):.3f}"),
}


class BarReporter:
    """A one-line bar on stderr for the stages in ``BAR_STAGES``, plain ``stage: message`` lines otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self._stream = stream
        self._width = width
        self._in_bar = False

    def __call__(self, event: ProgressEvent) -> None:
        stage, done, total = event["stage"], event.get("done", 0), event.get("total", 0)
        describe: Optional[Callable] = BAR_STAGES.get(stage)
        if describe is not None and total:
            title, counts = describe(event)
            elapsed = event["seconds"]
            eta = elapsed / done * (total - done) if done else 0.0
            filled = int(self._width * done / total)
            bar = "#" * filled + "-" * (self._width - filled)
            self._stream.write(f"\r{title} [{bar}] {counts}, {elapsed:.0f}s, ~{eta:.0f}s left\033[K")
            self._in_bar = True
        elif stage != "error":  # errors are printed by the command line itself
            if self._in_bar:
                self._stream.write("\n")
                self._in_bar = False
            if event.get("message"):
                self._stream.write(f"{stage}: {event['message']}\n")
        self._stream.flush()


def make_reporter(mode: str) -> Optional[ProgressCallback]:
    """Reporter for ``--progress bar|json|none``."""
    if mode == "json":
        return JsonLinesReporter()
    if mode == "bar":
        return BarReporter()
    return None
