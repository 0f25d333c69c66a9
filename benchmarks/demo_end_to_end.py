"""The demo end to end (process start to both files written), for code trees or options side by side.

Each run is a fresh ``python -m UNet3DSegmentLib demo`` process; the wall clock covers interpreter
start, imports, reading, the model, inference, the labelmap and the overlay. Rounds alternate the
order (A B, B A ...) so that a slow spell of a shared machine falls on both sides. The printed Dice
shows that the variants give the same answer.

    python benchmarks/demo_end_to_end.py --variant before=/tmp/base: --variant after=.: --rounds 2
    python benchmarks/demo_end_to_end.py --variant "overlap-0.5=.:--overlap 0.5" --variant "default=.:"

A variant is ``NAME=TREE:EXTRA ARGS``: TREE is a checkout whose ``UNet3DSegment`` folder is put first on
``PYTHONPATH`` (so an older commit's code runs with this environment's packages).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_once(tree: Path, extra: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve() / "UNet3DSegment"))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "UNet3DSegmentLib", "demo", "--output-dir", folder,
                               "--progress", "none", *extra], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"demo failed in {tree}: {done.stderr.strip().splitlines()[-1:]}")
    dice = dict(re.findall(r"(CSF|Grey matter|White matter) ([0-9.]+)", done.stdout))
    patches = re.search(r"(\d+) patches in ([0-9.]+) s", done.stdout)
    return {"seconds": seconds, "dice": dice, "patches": int(patches.group(1)),
            "inside_seconds": float(patches.group(2))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME=TREE:EXTRA ARGS (repeat)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from bench_inference import machine

    variants = []
    for text in args.variant:
        name, rest = text.split("=", 1)
        tree, _, extra = rest.partition(":")
        variants.append((name, Path(tree or "."), shlex.split(extra)))
    print(f"machine: {machine()}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for index in range(args.rounds):
        for name, tree, extra in (variants if index % 2 == 0 else variants[::-1]):
            result = run_once(tree, extra)
            results[name].append(result)
            print(f"{name}: {result['seconds']:.1f} s end to end, {result['patches']} patches "
                  f"({result['inside_seconds']:.1f} s in the pipeline), Dice {result['dice']}", flush=True)
    print("\n| variant | end to end (median) | runs | patches | Dice CSF / GM / WM |\n| --- | --- | --- | --- | --- |")
    for name, _, _ in variants:
        runs = results[name]
        dice = runs[0]["dice"]
        times = ", ".join("%.1f" % r["seconds"] for r in runs)
        median = statistics.median(r["seconds"] for r in runs)
        print(f"| {name} | {median:.1f} s | {times} | {runs[0]['patches']} | "
              f"{dice.get('CSF')} / {dice.get('Grey matter')} / {dice.get('White matter')} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
