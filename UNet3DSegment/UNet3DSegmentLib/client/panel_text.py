"""What the Slicer panel shows, computed without Qt: progress percent, patches, time left, card summary.

The module's widget only copies these strings and numbers into its Qt widgets, so everything that can
be wrong in them (percent mapping, time-left estimate, HTML escaping of names from a model card) is
tested here without Slicer.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..base.units import format_duration

# Share of the progress bar each stage fills, as (start, end) percent; inference gets the most.
STAGE_SPANS = {
    "load": (0, 5),
    "preprocess": (5, 10),
    "inference": (10, 92),
    "postprocess": (92, 96),
    "write": (96, 99),
    "done": (100, 100),
}
STAGE_TEXT = {
    "load": "Loading",
    "preprocess": "Preparing the volume",
    "inference": "Segmenting",
    "postprocess": "Building the labelmap",
    "write": "Writing the result",
    "done": "Importing the result",
}


@dataclass(frozen=True)
class ProgressView:
    """One refresh of the panel: bar value 0-100, text inside the bar, status line below it."""

    percent: int
    bar_text: str
    status: str


class ProgressTracker:
    """Turns the engine's progress events into panel views; estimates time left from the patch rate.

    The estimate uses the child's own clock (``seconds`` in each event) from the first inference
    event on, so model loading and warm-up do not distort the rate.
    """

    def __init__(self) -> None:
        self._first: Optional[tuple[int, float]] = None  # (done, seconds) at the first inference event
        self._last = ProgressView(0, "Starting", "Starting the engine...")

    @property
    def view(self) -> ProgressView:
        return self._last

    def seconds_left(self, done: int, total: int, seconds: float) -> Optional[float]:
        """Estimated seconds until the last patch, or None while there is no rate yet."""
        if self._first is None or total <= 0:
            return None
        first_done, first_seconds = self._first
        if done <= first_done or seconds <= first_seconds:
            return None
        rate = (seconds - first_seconds) / (done - first_done)
        return rate * (total - done)

    def update(self, event: dict[str, Any]) -> ProgressView:
        """The view after ``event``; events of unknown stages (warnings) only change the status line."""
        stage = event.get("stage", "")
        message = str(event.get("message", ""))
        if stage == "warning":
            self._last = ProgressView(self._last.percent, self._last.bar_text, f"Warning: {message}")
            return self._last
        if stage == "error":
            self._last = ProgressView(self._last.percent, "Failed", f"Failed: {message}")
            return self._last
        if stage not in STAGE_SPANS:
            return self._last
        start, end = STAGE_SPANS[stage]
        if stage != "inference":
            status = STAGE_TEXT[stage] + (f": {message}" if message and stage != "done" else "...")
            self._last = ProgressView(start, STAGE_TEXT[stage], status)
            return self._last

        done, total, seconds = int(event.get("done", 0)), int(event.get("total", 0)), float(event.get("seconds", 0))
        fraction = done / total if total > 0 else 0.0
        percent = int(start + (end - start) * min(max(fraction, 0.0), 1.0))
        left = self.seconds_left(done, total, seconds)
        if self._first is None:
            self._first = (done, seconds)
        patches = f"{done}/{total} patches"
        remaining = "estimating time left" if left is None else f"about {format_duration(left)} left"
        self._last = ProgressView(percent, patches, f"Segmenting: {patches}, {remaining}")
        return self._last


def log_line(previous: ProgressView, view: ProgressView, event: dict[str, Any]) -> Optional[str]:
    """The line the panel's log gets for ``event``, if any: each new stage and each tenth of the patches.

    Every event changes the status line; the log keeps what a reader needs afterwards without one
    line per patch.
    """
    if view.status == previous.status:
        return None
    if event.get("stage") != "inference":
        return view.status
    first = int(event.get("done", 0)) <= 1 and previous.bar_text != view.bar_text
    return view.status if first or view.percent // 10 != previous.percent // 10 else None


def segment_rows(statistics: Sequence[dict[str, Any]], card: Any) -> list[tuple[str, str, str]]:
    """The result table's rows from the engine's statistics (``done`` event): name, card colour, mL (2 decimals)."""
    rows = []
    for row in statistics:
        label = int(row["label"])
        color = card.classes[label].color if 0 <= label < len(card.classes) else "#808080"
        rows.append((str(row["name"]), color, f"{float(row['volume_ml']):.2f}"))
    return rows


def error_html(error: object) -> str:
    """An error as one red line for a panel label (HTML-escaped)."""
    return f"<span style='color:#c00000'>{html.escape(str(error))}</span>"


def card_summary_html(card: Any, from_file: bool = True) -> str:
    """Name, version, description and intended use of a model card, escaped for a QLabel."""
    title = html.escape(card.name) + (f" {html.escape(card.version)}" if card.version else "")
    lines = [f"<b>{title}</b>"]
    if card.description:
        lines.append(html.escape(card.description))
    if card.intended_use:
        lines.append(f"<i>{html.escape(card.intended_use)}</i>")
    if not from_file:
        lines.append("<span style='color:#b05000'>No model card beside this model: seed defaults assumed "
                     "(1 channel, 4 classes). Add a card to name the classes.</span>")
    return "<br>".join(lines)


def classes_html(card: Any) -> str:
    """The classes that become segments (all but background), each after a square of its colour."""
    items = [
        f"<span style='color:{c.color}'>&#9632;</span>&nbsp;{html.escape(c.name)}" for c in card.classes[1:]
    ]
    return "&nbsp;&nbsp; ".join(items)


def channel_label(card: Any, index: int) -> str:
    """Label of input selector ``index``: the card's channel name (``Input volume:`` for one channel)."""
    if card.in_channels == 1:
        return "Input volume:"
    return f"{card.input.channels[index]} volume:"
