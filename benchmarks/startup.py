"""Start-up of the command line: where the seconds go between process start and the first patch.

For ``unet3d-segment demo --progress json`` (the MNI152 template, bundled model) and ``unet3d-segment
segment IN -o OUT --progress json`` (IN: the MNI152 T1 resampled to 2 mm, made once in a temporary
folder), each round starts a fresh process that runs the real command line (``cli.main.main``) with
timers around its phases: interpreter start, the CLI's own imports, TensorFlow (and inside it Keras,
and inside Keras the optional scikit-learn, pandas and matplotlib), runtime set-up, reading the input,
model loading (card, Keras deserialisation, precision), input checks, preprocessing, the first batch
through the network (the ``tf.function`` trace plus one batch) against a later batch, the warm-up
when there is one, writing, and the demo's overlay. Timers wrap functions by name when their module is
imported, so the code runs as it would without them; phases that run on other threads overlap, and
"other" is what no timer covered before the first patch. The first patch is the first JSON event with
stage "inference", timed by the parent as it reads it; "end" is the process's exit.

Not part of the test suite. Medians over ``--rounds`` fresh processes.

    python benchmarks/startup.py --rounds 3
    python benchmarks/startup.py --rounds 3 --commands segment --first-patch   # stop at the first patch
    python benchmarks/startup.py --rounds 3 --json results.json
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
LIB = "UNet3DSegmentLib"
T0_VARIABLE = "UNET3D_STARTUP_T0"  # the parent's time.time() just before it started the child
PACKAGE_VARIABLE = "UNET3D_STARTUP_PACKAGE"  # the folder holding the UNet3DSegmentLib to run
IMPORTS = ("tensorflow", "keras", "sklearn", "pandas", "matplotlib", "matplotlib.pyplot", "scipy", "nilearn",
           "SimpleITK", "h5py")
# (phase, module, attribute): functions timed when their module is imported; a missing one is skipped.
TIMED = [
    ("tensorflow import", "runtime.tensorflow_setup", "import_tensorflow_quietly"),
    ("runtime set-up", "runtime.backends", "configure_runtime"),
    ("read input: nilearn data folder", "training.demo", "nilearn_data_dir"),
    ("read input", "training.demo", "load_template"),
    ("read input", "engine.image_io", "read_channels"),
    ("model load", "engine.loading", "load_model"),
    ("model load: card", "engine.loading", "card_for_model"),
    ("model load: keras deserialisation", "engine.loading", "_load_keras"),
    ("model load: precision", "engine.loading", "apply_precision"),
    ("input checks", "engine.input_checks", "check_images"),
    ("preprocess", "engine.preprocessing", "prepare"),
    ("warm-up (trace)", "runtime.predictors", "TensorflowForward.warm_up"),
    ("forward batch", "runtime.predictors", "TensorflowForward.__call__"),
    ("write", "engine.image_io", "write_outputs"),
    ("write", "engine.image_io", "write_segmentation"),
    ("overlay", "training.demo", "save_overlay"),
]
# Phases whose intervals make up the breakdown (the others are details inside one of them).
TOP_PHASES = ("cli import", "tensorflow import", "runtime set-up", "read input", "model load", "input checks",
              "preprocess", "warm-up (trace)", "first batch (trace + run)")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per command (default 3)")
    parser.add_argument("--commands", default="demo,segment", help="comma-separated: demo, segment")
    parser.add_argument("--input", help="segment's input (default: the MNI152 T1 at 2 mm, made once)")
    parser.add_argument("--first-patch", action="store_true", help="stop each run (SIGTERM) at the first patch")
    parser.add_argument("--json", metavar="PATH", help="also write all runs to this JSON file")
    parser.add_argument("--packages", default=str(REPO / "UNet3DSegment"),
                        help="comma-separated folders holding a UNet3DSegmentLib (e.g. a copy of the code "
                        "before a change), run in turn in every round (default: this checkout's)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ child
class Timeline:
    """Intervals (phase, start, end, thread) in seconds since the parent started the process."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.intervals: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.time() - self.t0

    def add(self, phase: str, start: float, end: float) -> None:
        with self._lock:
            self.intervals.append({"phase": phase, "start": round(start, 4), "end": round(end, 4),
                                   "thread": threading.current_thread().name})

    def wrap(self, phase: str, function: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self.now()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(phase, start, self.now())

        timed.__wrapped__ = function  # type: ignore[attr-defined]
        return timed


class _TimedLoader:
    """A module loader that times the module's execution and then wraps the functions in ``TIMED``."""

    def __init__(self, loader: Any, name: str, timeline: Timeline) -> None:
        self._loader, self._name, self._timeline = loader, name, timeline

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._loader, attribute)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        start = self._timeline.now()
        self._loader.exec_module(module)
        if self._name in IMPORTS:
            self._timeline.add(f"import {self._name}", start, self._timeline.now())
        for phase, where, attribute in TIMED:
            if f"{LIB}.{where}" == self._name:
                _patch(module, attribute, phase, self._timeline)


def _patch(module: Any, attribute: str, phase: str, timeline: Timeline) -> None:
    owner_name, _, name = attribute.rpartition(".")
    owner = getattr(module, owner_name) if owner_name else module
    if hasattr(owner, name):
        setattr(owner, name, timeline.wrap(phase, getattr(owner, name)))


class _TimingFinder(importlib.abc.MetaPathFinder):
    """Finds watched modules with the other finders and gives them a :class:`_TimedLoader`."""

    def __init__(self, timeline: Timeline) -> None:
        self._timeline = timeline
        self._names = set(IMPORTS) | {f"{LIB}.{where}" for _, where, _ in TIMED}

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self._names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _TimedLoader(spec.loader, name, self._timeline)
                return spec
        return None


def run_child(argv: list[str], report: Path) -> int:
    """Run the command line in this process with the timers; write the intervals to ``report``."""
    timeline = Timeline(float(os.environ[T0_VARIABLE]))
    started = timeline.now()
    sys.path.insert(0, os.environ.get(PACKAGE_VARIABLE, str(REPO / "UNet3DSegment")))
    sys.meta_path.insert(0, _TimingFinder(timeline))
    start = timeline.now()
    from UNet3DSegmentLib.cli.main import main

    timeline.add("cli import", start, timeline.now())
    code = 1
    try:
        code = main(argv)
    finally:
        report.write_text(json.dumps({"interpreter": started, "intervals": timeline.intervals, "exit": code}))
    return code


# ----------------------------------------------------------------------------------------- parent
def mni_2mm(folder: Path) -> Path:
    """The MNI152 T1 from nilearn's package data, resampled to 2 mm (linear), as a .nii.gz in ``folder``."""
    import SimpleITK as sitk

    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise SystemExit("the default input needs nilearn (pip install 'unet3dsegment[demo]'); or pass --input")
    template = Path(spec.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    image = sitk.ReadImage(str(template), sitk.sitkFloat32)
    size = [int(round(n * s / 2.0)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), (2.0, 2.0, 2.0),
                              image.GetDirection(), 0.0, sitk.sitkFloat32)
    path = folder / "mni152_t1_2mm.nii.gz"
    sitk.WriteImage(resampled, str(path))
    return path


def command_line(command: str, folder: Path, input_path: Path) -> list[str]:
    if command == "demo":
        return ["demo", "--output-dir", str(folder / "demo"), "--progress", "json"]
    return ["segment", str(input_path), "-o", str(folder / "out.seg.nrrd"), "--overwrite", "--progress", "json"]


def timed_run(command: list[str], folder: Path, stop_at_first_patch: bool, package: str) -> dict[str, Any]:
    """One fresh process: event times as the parent read them, the exit time, the child's intervals."""
    report = folder / "phases.json"
    report.unlink(missing_ok=True)
    env = {**os.environ, T0_VARIABLE: repr(time.time()), "TF_CPP_MIN_LOG_LEVEL": "3", PACKAGE_VARIABLE: package}
    t0 = float(env[T0_VARIABLE])
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(report), *command],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    events: list[dict[str, Any]] = []
    for line in child.stdout:  # type: ignore[union-attr]
        seen = time.time() - t0
        try:
            event = json.loads(line)
        except ValueError:
            continue
        events.append({"stage": event.get("stage"), "at": round(seen, 3), "message": event.get("message", "")})
        if stop_at_first_patch and event.get("stage") == "inference":
            child.terminate()
    _, stderr = child.communicate()
    end = time.time() - t0
    first = next((e["at"] for e in events if e["stage"] == "inference"), None)
    if first is None:
        raise SystemExit(f"no inference event from {' '.join(command)} (exit {child.returncode}): {stderr[-2000:]}")
    phases = json.loads(report.read_text()) if report.exists() else {"interpreter": None, "intervals": []}
    return {"first_patch": first, "end": round(end, 3), "exit": child.returncode, "events": events, **phases}


def breakdown(run: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase of one run (summed over its intervals), plus derived rows."""
    rows: dict[str, float] = {"interpreter start": run["interpreter"]}
    forward = [i for i in run["intervals"] if i["phase"] == "forward batch"]
    for interval in run["intervals"]:
        if interval["phase"] != "forward batch":
            rows[interval["phase"]] = rows.get(interval["phase"], 0.0) + interval["end"] - interval["start"]
    if forward:
        rows["first batch (trace + run)"] = forward[0]["end"] - forward[0]["start"]
        later = [i["end"] - i["start"] for i in forward[1:]]
        if later:
            rows["later batch (median)"] = statistics.median(later)
    first_patch = run["first_patch"]
    spans = [(i["start"], min(i["end"], first_patch)) for i in run["intervals"]
             if i["phase"] in TOP_PHASES and i["start"] < first_patch]
    covered = _union(spans + [(forward[0]["start"], forward[0]["end"])] if forward else spans)
    rows["other, before the first patch"] = first_patch - run["interpreter"] - covered
    rows["first patch (process start to event)"] = first_patch
    rows["end (process start to exit)"] = run["end"]
    return rows


def _union(spans: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def table(command: str, runs: list[dict[str, Any]]) -> list[str]:
    rows = [breakdown(run) for run in runs]
    names = list(dict.fromkeys(name for row in rows for name in row))
    lines = [f"\n{command} ({len(runs)} rounds, medians; phases on other threads overlap the main thread)",
             "| phase | seconds (median) | runs |", "| --- | --- | --- |"]
    for name in names:
        values = [row[name] for row in rows if name in row]
        lines.append(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    return lines


def _label(command: str, package: str, packages: list[str]) -> str:
    return command if len(packages) == 1 else f"{command} [{package}]"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args.child[1:], Path(args.child[0]))
    from bench_inference import machine  # same folder; imported here so children start without numpy
    folder = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    input_path = Path(args.input) if args.input else (mni_2mm(folder) if "segment" in commands else folder)
    print(f"machine: {machine()}", flush=True)
    packages = [p.strip() for p in args.packages.split(",") if p.strip()]
    kinds = [(command, package) for command in commands for package in packages]
    results: dict[str, list[dict[str, Any]]] = {_label(*kind, packages): [] for kind in kinds}
    for round_index in range(args.rounds):
        order = kinds if round_index % 2 == 0 else list(reversed(kinds))  # A B B A on a shared machine
        for command, package in order:
            run = timed_run(command_line(command, folder, input_path), folder, args.first_patch, package)
            label = _label(command, package, packages)
            results[label].append(run)
            print(f"{label} {round_index + 1}: first patch {run['first_patch']:.2f} s, end {run['end']:.2f} s, "
                  f"exit {run['exit']}", flush=True)
    for label, runs in results.items():
        print("\n".join(table(label, runs)))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv),
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
