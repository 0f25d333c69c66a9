"""Stand-ins for the worker process functions of ``engine/cohort.py`` (Testing/test_batch.py): imported
by spawned worker processes, so they live in a small module of their own (no framework import)."""

from __future__ import annotations

import os
from pathlib import Path

_FOLDER = None


def init(spec, cancel) -> None:
    global _FOLDER
    _FOLDER = Path(spec[0])


def run(case):
    """``die*`` kills its worker process every time; ``flaky`` once; every other case is ok."""
    if case.name.startswith("die"):
        os._exit(1)
    if case.name == "flaky":
        marker = _FOLDER / "flaky.died"
        if not marker.exists():
            marker.write_text("once")
            os._exit(1)
    return {"case": case.name, "status": "ok", "output": "", "seconds": 0.0, "message": ""}, os.getpid()
