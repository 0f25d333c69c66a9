"""Per-patch speed of the demo network on the CPU under different settings (issue 15, part 3).

Each variant runs in a fresh process (so that its threads, oneDNN and XLA settings are its own) and
times the bundled demo model (seed topology, 16 base filters, 64^3 patches, 4 classes) on the same
batches of normalised noise after one warm-up call. Rounds alternate the variant order (A B ... B A),
so that a slow spell of a shared machine falls on both sides; the table gives each variant's median.

    python benchmarks/cpu_variants.py --rounds 2
    pip install --target /tmp/extra torch==2.13.0 jax jaxlib   # then: --extra-path /tmp/extra
    python benchmarks/cpu_variants.py --variants tf-b1,tf-b2,tf-b4,tf-b2-xla,tf-b2-no-onednn,torch-b2,jax-b2

Variants: ``tf-bN`` (the engine's TensorFlow predictor, batch N), ``tf-b2-no-onednn``
(``TF_ENABLE_ONEDNN_OPTS=0``), ``tf-b2-xla`` (the same model in a ``tf.function(jit_compile=True)``),
``torch-b2`` / ``jax-b2`` (Keras on PyTorch / JAX, when installed; skipped otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_VARIANTS = "tf-b1,tf-b2,tf-b4,tf-b2-xla,tf-b2-no-onednn,torch-b2,jax-b2"


def child(variant: str, patches: int) -> dict:
    """Time one variant in this process; returns seconds per patch (median over batches)."""
    import numpy as np

    batch = int(variant.split("-b")[1].split("-")[0])
    from UNet3DSegmentLib.engine.bundled_models import default_model_path
    from UNet3DSegmentLib.engine.loading import load_model
    from UNet3DSegmentLib.runtime.tensorflow_setup import configure_tensorflow

    if variant.startswith("tf"):
        configure_tensorflow("cpu")
    model = load_model(default_model_path())
    forward = model.predict
    if variant.endswith("-xla"):
        import tensorflow as tf

        keras_model = model.keras_model
        compiled = tf.function(lambda x: tf.cast(keras_model(x, training=False), tf.float32), jit_compile=True)
        forward = lambda array: compiled(array).numpy()  # noqa: E731 - a local benchmark predictor
    rng = np.random.default_rng(0)
    data = rng.standard_normal((batch, 64, 64, 64, 1)).astype(np.float32)
    start = time.perf_counter()
    forward(data)  # warm-up: trace / compile
    first = time.perf_counter() - start
    times = []
    for _ in range(max(1, patches // batch)):
        start = time.perf_counter()
        forward(data)
        times.append((time.perf_counter() - start) / batch)
    return {"variant": variant, "seconds_per_patch": statistics.median(times), "first_call": first,
            "batches": len(times), "backend": model.backend}


def run_variant(variant: str, patches: int, extra_path: str = "") -> dict | None:
    env = dict(os.environ)
    if extra_path and variant.startswith(("torch", "jax")):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH", "")) if p)
    if variant.startswith("torch"):
        env["KERAS_BACKEND"] = "torch"
    elif variant.startswith("jax"):
        env["KERAS_BACKEND"] = "jax"
    if "no-onednn" in variant:
        env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    done = subprocess.run([sys.executable, __file__, "--child", variant, "--patches", str(patches)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{variant}: skipped ({tail})", flush=True)
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--patches", type=int, default=8, help="timed patches per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--extra-path", default="",
                        help="folder with torch / jax (pip install --target), for their variants only")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.patches)))
        return 0
    from bench_inference import machine

    print(f"machine: {machine()}", flush=True)
    variants = args.variants.split(",")
    results: dict[str, list[float]] = {}
    for index in range(args.rounds):
        for variant in (variants if index % 2 == 0 else list(reversed(variants))):
            result = run_variant(variant, args.patches, args.extra_path)
            if result is not None:
                results.setdefault(variant, []).append(result["seconds_per_patch"])
    base = statistics.median(results["tf-b2"]) if "tf-b2" in results else None
    print("\n| variant | s per patch (median of rounds) | runs | vs tf-b2 |\n| --- | --- | --- | --- |")
    for variant in variants:
        if variant in results:
            median = statistics.median(results[variant])
            ratio = f"{base / median:.2f}x" if base else "-"
            runs = ", ".join(f"{t:.3f}" for t in results[variant])
            print(f"| {variant} | {median:.3f} | {runs} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
