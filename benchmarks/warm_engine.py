"""Click-to-first-patch, cold against warm engine (not part of the test suite; results in BENCHMARKS.md).

What a Slicer user waits for after pressing Segment: from the start of ``UNet3DSegmentLogic.segment``
(volume written to NRRD, engine child started or request sent) until the engine's first ``inference``
event with ``done >= 1`` (the first batch of patches has gone through the network). Also the time to
the segmentation node in the scene (the whole run).

- cold: ``keepEngineWarm=False``, a new ``segment`` child per run (framework start-up, model load,
  first trace of the forward pass, then the run);
- warm: ``keepEngineWarm=True``, the same ``serve`` child with the model loaded for every run; its very
  first run starts the child and is reported on its own line ("warm engine, first run").

On slicer-core (headless MRML, the same logic the Slicer module runs), the bundled demo model
``Resources/Models/brain_tissue_demo.keras`` and the MNI152 2009 T1 template from nilearn
(197 x 233 x 189 voxels at 1 mm, the demo's volume). Cold and warm runs alternate, so that a slow
spell of a shared machine falls on both.

    python benchmarks/warm_engine.py                 # 3 repeats each
    python benchmarks/warm_engine.py --repeats 5 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_inference import machine  # same folder: run as python benchmarks/warm_engine.py
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "UNet3DSegment"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each kind (default 3)")
    parser.add_argument("--model", default=str(REPO / "Resources" / "Models" / "brain_tissue_demo.keras"))
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def headless_scene() -> tuple[Any, Any]:
    """An MRML scene set up as Slicer's start-up would (slicer-core), and the object that keeps it alive."""
    from UNet3DSegmentLib.mrml.headless import startHeadlessApplication

    application = startHeadlessApplication()
    return application.scene, application


def demo_volume(scene: Any, folder: Path) -> Any:
    """The MNI152 T1 template as a scalar volume node (read through Slicer's storage node)."""
    import SimpleITK as sitk
    import slicer

    from UNet3DSegmentLib.training.demo import load_template_maps

    t1, _, _ = load_template_maps()
    path = folder / "mni152_t1.nrrd"
    sitk.WriteImage(t1, str(path))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MNI152 T1")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(volume):
        raise SystemExit(f"cannot read {path}")
    return volume


def timed_run(logic: Any, volume: Any, model: str) -> dict[str, Any]:
    """One Segment click: seconds to the first patch and to the segmentation node, and what the engine said."""
    first: dict[str, Any] = {}
    events: list[dict] = []
    start = time.perf_counter()

    def progress(event: dict) -> None:
        events.append(event)
        if not first and event.get("stage") == "inference" and event.get("done", 0) >= 1:
            first["seconds"] = time.perf_counter() - start
            first["event"] = event

    node = logic.segment(volume, model=model, progress=progress, showResult=False)
    total = time.perf_counter() - start
    logic.scene.RemoveNode(node)
    patches = next((e for e in reversed(events) if e["stage"] == "inference"), {})
    engine = getattr(logic, "_warmEngine", None)
    return {
        "first_patch_seconds": round(first["seconds"], 3),
        "total_seconds": round(total, 3),
        "patches_in_first_event": first["event"]["done"],
        "patches": patches.get("total"),
        "engine_pid": engine.pid if engine is not None else None,
        "precision": next((e["message"] for e in events if "mixed precision" in e.get("message", "")), "fp32"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from UNet3DSegmentLib.mrml.logic import UNet3DSegmentLogic

    folder = Path(tempfile.mkdtemp(prefix="bench_warm_"))
    scene, _logics = headless_scene()
    volume = demo_volume(scene, folder)
    print(f"machine: {machine()}", flush=True)
    print(f"volume: {volume.GetImageData().GetDimensions()} voxels; model: {args.model}", flush=True)
    cold_logic = UNet3DSegmentLogic(scene=scene, temporaryRoot=folder / "cold")
    warm_logic = UNet3DSegmentLogic(scene=scene, temporaryRoot=folder / "warm", keepEngineWarm=True)
    results: dict[str, list[dict[str, Any]]] = {"cold": [], "warm-first": [], "warm": []}
    try:
        results["warm-first"].append(timed_run(warm_logic, volume, args.model))
        print("warm engine, first run (starts the server):", results["warm-first"][0], flush=True)
        for repeat in range(args.repeats):
            for kind, logic in (("cold", cold_logic), ("warm", warm_logic)):
                result = timed_run(logic, volume, args.model)
                results[kind].append(result)
                print(f"{kind} {repeat + 1}: {result}", flush=True)
    finally:
        warm_logic.shutdownEngine(wait=True)
    pids = {r["engine_pid"] for r in results["warm-first"] + results["warm"]}
    print(f"warm engine process ids: {sorted(pids)} (one id: every warm run used the same child)")

    print("\n| run | click to first patch (s) | click to segments (s) |")
    print("| --- | --- | --- |")
    rows = [("cold (new child per run)", results["cold"]), ("warm engine, first run", results["warm-first"]),
            ("warm engine, later runs", results["warm"])]
    summary = {}
    for title, runs in rows:
        first = [r["first_patch_seconds"] for r in runs]
        total = [r["total_seconds"] for r in runs]
        summary[title] = {"first_patch_median": statistics.median(first), "total_median": statistics.median(total)}
        print(f"| {title} | {', '.join(f'{v:.2f}' for v in first)} (median {statistics.median(first):.2f}) | "
              f"{', '.join(f'{v:.1f}' for v in total)} (median {statistics.median(total):.1f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results, "summary": summary},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
