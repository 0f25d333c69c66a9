"""Cohort benchmark: N separate ``segment`` processes vs ``batch`` (local, 1 and 2 workers) vs ``batch --engine ray``.

Not part of the test suite; results in BENCHMARKS.md ("Batch: a cohort"). The cohort is ``--cases``
randomly transformed copies of nilearn's MNI152 T1 (the demo's held-out copies, seeds 9000+),
block-averaged by ``--downsample`` so that a case costs seconds rather than minutes on a small CPU,
segmented with the bundled demo model. Every variant runs as its own command, timed from outside
(wall clock, start-up included); the per-case time inside a run comes from its summary.json.

    python benchmarks/batch.py                        # 8 cases, downsample 2, overlap 0.25
    python benchmarks/batch.py --cases 12 --variants separate,local,ray2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "UNet3DSegment"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
VARIANTS = ("separate", "local", "local2", "ray2")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--downsample", type=int, default=2, help="block-average factor of the MNI152 copies")
    parser.add_argument("--overlap", default="0.25")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", help="keep the cohort and outputs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args(argv)


def make_cohort(folder: Path, cases: int, downsample: int) -> None:
    import SimpleITK as sitk

    from UNet3DSegmentLib.training.demo import load_template_maps, transformed_copy

    folder.mkdir(parents=True, exist_ok=True)
    t1, gm, wm = load_template_maps()
    for index in range(cases):
        image, _ = transformed_copy(t1, gm, wm, 9000 + index)
        if downsample > 1:
            image = sitk.BinShrink(image, [downsample] * 3)
        sitk.WriteImage(image, str(folder / f"mni_{index:02d}.nii.gz"))


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "UNet3DSegmentLib", *args]


def timed(argv: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO / "UNet3DSegment"), RAY_AUTH_MODE="disabled")
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="batch-bench-"))
    cohort = work / "cohort"
    if not cohort.is_dir():
        make_cohort(cohort, args.cases, args.downsample)
    files = sorted(cohort.glob("*.nii.gz"))
    common = ["--overlap", args.overlap, "--progress", "none"]
    figures: dict[str, dict] = {}
    for variant in args.variants.split(","):
        out = work / f"out-{variant}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if variant == "separate":
            per_process = [timed(command("segment", str(f), "-o", str(out / f"{f.name[:-7]}.seg.nrrd"), *common))
                           for f in files]
            figures[variant] = {"total": sum(per_process), "per_process": per_process}
        else:
            extra = {"local": [], "local2": ["--workers", "2"], "ray2": ["--engine", "ray", "--workers", "2"]}[variant]
            total = timed(command("batch", str(cohort), "-o", str(out), *extra, *common))
            summary = json.loads((out / "summary.json").read_text())
            assert summary["ok"] == len(files), summary
            figures[variant] = {"total": total, "inside_run": summary["total_seconds"],
                                "mean_case_seconds": summary["mean_case_seconds"]}
        figures[variant]["per_case"] = figures[variant]["total"] / len(files)
        print(variant, json.dumps(figures[variant]), flush=True)
    if "ray2" in figures and "local2" in figures:
        extra = figures["ray2"]["total"] - figures["local2"]["total"]
        figures["ray_overhead_per_case"] = extra / len(files) / figures["local2"]["per_case"]
    if "separate" in figures and "local" in figures:
        figures["speedup_local"] = figures["separate"]["total"] / figures["local"]["total"]
    figures["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    figures["cases"] = len(files)
    print(json.dumps({k: v for k, v in figures.items() if not isinstance(v, dict)}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
