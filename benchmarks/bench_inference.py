"""Sliding-window inference benchmark (not part of the test suite; results in BENCHMARKS.md).

For each variant it prints the per-patch model time (the compiled predictor alone), the total
sliding-window time, the overhead ratio total / (patches x per-patch time), voxels/s and the peak RSS.
Every variant runs in its own process, so that peak RSS and TensorFlow's thread setup belong to it.

Variants: ``engine-fp32``, ``engine-bf16`` (this engine's ``sliding_window_predict``), and, when
``monai`` and ``torch`` are installed, ``monai-fp32`` / ``monai-bf16``: MONAI's
``sliding_window_inference`` calling the same compiled predictor with the same patch, overlap,
batch size and Gaussian blend (sigma = patch / 8). ``--rounds 2`` runs the variant list forwards and
then backwards (A B B A), so that a slow or fast spell of a shared machine falls on both sides.
``--backend torch|jax`` runs the model through Keras on PyTorch or JAX (with ``--device gpu``: the
GPU figures, with the share of the GPU's bf16 peak given by ``--peak-tflops``). ``--oom-check``
forces GPU out-of-memory with PyTorch's memory cap and checks the fallback.

    python benchmarks/bench_inference.py                       # 240x240x155, full seed net, overlap 0.5
    python benchmarks/bench_inference.py --shape 128,128,128   # reduced size (z, y, x)
    python benchmarks/bench_inference.py --demo-dice           # bf16 vs fp32 Dice on the demo model
    python benchmarks/bench_inference.py --memory-check        # 512x512x400 CT, tiny model: peak RSS
    python benchmarks/bench_inference.py --backend torch --device gpu --variants engine-fp32,engine-bf16
    python benchmarks/bench_inference.py --backend torch --device gpu --oom-check
    python benchmarks/bench_inference.py --same-process fp32 --rounds 2   # engine vs MONAI, one process
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
VARIANTS = ("engine-fp32", "engine-bf16", "monai-fp32", "monai-bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="155,240,240", help="volume size z,y,x (default 155,240,240)")
    parser.add_argument("--model", help=".keras model (default: the full seed network, random weights)")
    parser.add_argument("--base-filters", type=int, default=32, help="seed network width without --model")
    parser.add_argument("--patch", default="64,64,64", help="patch z,y,x without --model (default 64^3)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4, help="timed batches for the per-patch time")
    parser.add_argument("--threads", type=int, default=None, help="TensorFlow intra-op threads (default: cores)")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="cpu")
    parser.add_argument("--backend", choices=["tensorflow", "torch", "jax"], default="tensorflow",
                        help="Keras backend that runs the model (default tensorflow)")
    parser.add_argument("--blend-on", choices=["host", "device"], default="host",
                        help="engine variants: blend in main memory (host) or in the backend's arrays (device)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the variant list this many times, every other round in reverse order")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak in TFLOP/s, to print the share of it used")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per variant")
    parser.add_argument("--serial", action="store_true",
                        help="engine: assemble, predict and blend in turn on one thread (no prefetch/model thread)")
    parser.add_argument("--variants", default="engine-fp32,engine-bf16,monai-fp32",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--demo-dice", action="store_true", help="bf16 vs fp32 on the demo model and template")
    parser.add_argument("--memory-check", action="store_true", help="512x512x400 CT with a tiny model: peak RSS")
    parser.add_argument("--same-process", choices=["fp32", "bf16"], default=None,
                        help="engine and MONAI alternately in one process on one predictor (--rounds 2: A B B A)")
    parser.add_argument("--compare", default="engine,monai",
                        help="with --same-process: windows to alternate, from engine, engine-serial, monai")
    parser.add_argument("--oom-check", action="store_true",
                        help="GPU (torch backend): force out-of-memory with a memory cap; check the fallback")
    parser.add_argument("--json", metavar="PATH", help="also write all results to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def shape_of(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3:
        raise SystemExit(f"shape must be three integers z,y,x, got {text!r}")
    return values  # type: ignore[return-value]


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------ child
def load_predictor(args: argparse.Namespace, precision: str) -> Any:
    """The engine's LoadedModel (compiled for its backend) for the benchmark model in ``precision``."""
    from UNet3DSegmentLib.runtime.backends import backend_installed, select_backend

    select_backend(args.backend, args.device)  # before Keras is imported
    if backend_installed("tensorflow"):
        from UNet3DSegmentLib.runtime.tensorflow_setup import import_tensorflow_quietly

        import_tensorflow_quietly()
    from UNet3DSegmentLib.engine.loading import load_model
    from UNet3DSegmentLib.runtime.backends import configure_runtime

    configure_runtime(args.device, threads=args.threads)
    if args.model:
        return load_model(Path(args.model), precision=precision)
    import keras

    from UNet3DSegmentLib.engine.network import build_unet3d

    keras.utils.set_random_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="bench_model_"))
    path = folder / "seed.keras"
    build_unet3d(shape_of(args.patch), base_filters=args.base_filters).save(path)
    return load_model(path, precision=precision)


def per_patch_seconds(predict: Any, batch: np.ndarray, repeats: int) -> float:
    """Median seconds per patch of the predictor alone (after one warm-up call)."""
    predict(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / batch.shape[0]


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    kind, precision = args.child.split("-")
    shape = shape_of(args.shape)
    loaded = load_predictor(args, precision)
    patch = loaded.patch_size
    image = np.random.default_rng(0).normal(size=shape + (loaded.in_channels,)).astype(np.float32)
    batch = image[None, : patch[0], : patch[1], : patch[2]].repeat(args.batch_size, axis=0).copy()
    model_seconds = per_patch_seconds(loaded.predict, batch, args.repeats)
    from UNet3DSegmentLib.engine.memory import model_flops

    flops = model_flops(loaded.keras_model)
    total, calls, labels = time_window(kind, image, loaded, args)
    patches = calls["patches"]
    return {
        "variant": args.child + ("-serial" if args.serial and kind == "engine" else ""),
        "backend": loaded.backend,
        "precision": loaded.precision,
        "device": loaded.device,
        "gflop_per_patch": flops / 1e9,
        "shape_zyx": list(shape),
        "patch": list(patch),
        "overlap": args.overlap,
        "batch_size": args.batch_size,
        "patches": patches,
        "model_seconds_per_patch": model_seconds,
        "in_run_model_seconds_per_patch": calls["seconds"] / patches,
        "total_seconds": total,
        "overhead_ratio": total / (patches * model_seconds),
        "in_run_overhead_ratio": total / calls["seconds"],
        "voxels_per_second": float(np.prod(shape)) / total,
        "patches_per_second": patches / total,
        "peak_rss_bytes": max_rss_bytes(),
        "label_checksum": int(np.bincount(labels.ravel(), minlength=4)[:4] @ np.arange(1, 5)),
    }


def time_window(kind: str, image: np.ndarray, loaded: Any, args: argparse.Namespace
                ) -> tuple[float, dict[str, float], np.ndarray]:
    """One whole sliding window (``engine`` or ``monai``) plus argmax: seconds, model calls, labels."""
    calls = {"patches": 0, "seconds": 0.0}

    def counted(array: np.ndarray) -> np.ndarray:
        calls["patches"] += array.shape[0]
        begin = time.perf_counter()
        result = loaded.predict(array)
        calls["seconds"] += time.perf_counter() - begin
        return result

    start = time.perf_counter()
    if kind == "engine" and getattr(args, "blend_on", "host") == "device":
        # Blending on the model's device: no per-batch copy to the host, so the model's own time inside the
        # run is not measurable here; the per-patch time measured before the run stands for it.
        from UNet3DSegmentLib.engine.device_window import device_sliding_window, model_blender

        def count(done: int, total: int) -> None:
            calls["patches"] = done

        result = device_sliding_window(image, model_blender(loaded, "float32"), None, count,
                                       patch_size=loaded.patch_size, overlap=args.overlap, blend="gaussian",
                                       batch_size=args.batch_size, skip_empty=False)
        calls["seconds"] = float("nan")
        return time.perf_counter() - start, calls, result.labels
    if kind in ("engine", "engine-serial"):
        from UNet3DSegmentLib.engine.window import sliding_window_predict

        serial = args.serial or kind == "engine-serial"
        result = sliding_window_predict(image, counted, patch_size=loaded.patch_size, overlap=args.overlap,
                                        blend="gaussian", batch_size=args.batch_size, prefetch=not serial)
    else:
        result = run_monai(image, counted, loaded.patch_size, args)
    labels = result.argmax(-1)
    return time.perf_counter() - start, calls, labels


def same_process_child(args: argparse.Namespace) -> dict[str, Any]:
    """Engine and MONAI alternately in one process on one compiled predictor (A B B A ... order).

    Separate processes can differ by several per cent in the speed of the very same compiled model
    (memory placement, a shared machine's neighbours); here both windows call the same function on
    the same weights, so the ratio of their totals is the ratio of what they add around the model.
    """
    precision = args.child.split("-")[1]
    loaded = load_predictor(args, precision)
    patch = loaded.patch_size
    image = np.random.default_rng(0).normal(size=shape_of(args.shape) + (loaded.in_channels,)).astype(np.float32)
    batch = image[None, : patch[0], : patch[1], : patch[2]].repeat(args.batch_size, axis=0).copy()
    per_patch_seconds(loaded.predict, batch, 1)  # warm-up (traces, autotunes)
    runs = []
    for kind in variant_order(args.compare.split(","), max(1, args.rounds)):
        total, calls, labels = time_window(kind, image, loaded, args)
        runs.append({"kind": kind, "total_seconds": total, "model_seconds": calls["seconds"],
                     "patches": calls["patches"],
                     "label_checksum": int(np.bincount(labels.ravel(), minlength=4)[:4] @ np.arange(1, 5))})
        print(f"  {kind:<13} {total:.1f} s (model {calls['seconds']:.1f} s, around it "
              f"{total - calls['seconds']:.2f} s)", file=sys.stderr, flush=True)
    return {"precision": loaded.precision, "device": loaded.device, "backend": loaded.backend, "runs": runs}


def child_result(args: argparse.Namespace, child: str, env: dict[str, str] | None = None,
                 live_stderr: bool = False) -> dict[str, Any]:
    """Run the benchmark as ``--child child`` and return the JSON of its last stdout line.

    ``live_stderr`` lets the child's progress lines through as they come; otherwise its stderr is
    kept and shown only if it fails.
    """
    done = subprocess.run(child_command(args, child), stdout=subprocess.PIPE, text=True, timeout=args.timeout,
                          stderr=None if live_stderr else subprocess.PIPE, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{child} failed\n{(done.stderr or '')[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_process(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`same_process_child` for ``--same-process fp32|bf16`` and print the ratio."""
    result = child_result(args, f"same-{args.same_process}", live_stderr=True)
    kinds = args.compare.split(",")
    sums = {kind: sum(r["total_seconds"] for r in result["runs"] if r["kind"] == kind) for kind in kinds}
    model = {kind: sum(r["model_seconds"] for r in result["runs"] if r["kind"] == kind) for kind in kinds}
    result["totals"], result["model_totals"] = sums, model
    order = " ".join(r["kind"] for r in result["runs"])
    print(f"same process, {result['backend']} {result['precision']} on {result['device']}, windows in the "
          f"order {order}:", flush=True)
    for kind in kinds:
        print(f"  {kind:<13} total {sums[kind]:.1f} s, model {model[kind]:.1f} s, around the model "
              f"{sums[kind] - model[kind]:.2f} s", flush=True)
    if "engine" in sums and "monai" in sums:
        result["monai_over_engine"] = sums["monai"] / sums["engine"]
        print(f"MONAI / engine: x{result['monai_over_engine']:.4f}", flush=True)
    return result


def run_monai(image: np.ndarray, predict: Any, patch: tuple[int, int, int], args: argparse.Namespace) -> np.ndarray:
    """MONAI's sliding window over the same TF predictor (channels-first tensors converted each call)."""
    import torch
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))

    def predictor(window: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(window.numpy().transpose(0, 2, 3, 4, 1))
        return torch.from_numpy(np.ascontiguousarray(predict(batch).transpose(0, 4, 1, 2, 3)))

    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(3, 0, 1, 2)))[None]
    with torch.no_grad():
        output = sliding_window_inference(tensor, patch, args.batch_size, predictor, overlap=args.overlap,
                                          mode="gaussian", sigma_scale=0.125)
    return output[0].numpy().transpose(1, 2, 3, 0)


# ----------------------------------------------------------------------------------------- parent
def child_command(args: argparse.Namespace, variant: str) -> list[str]:
    command = [sys.executable, __file__, "--child", variant, "--shape", args.shape, "--overlap", str(args.overlap),
               "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--device", args.device,
               "--base-filters", str(args.base_filters), "--patch", args.patch, "--backend", args.backend,
               "--rounds", str(args.rounds), "--compare", args.compare, "--blend-on", args.blend_on]
    if args.model:
        command += ["--model", args.model]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.serial:
        command += ["--serial"]
    return command


def variant_order(variants: list[str], rounds: int) -> list[str]:
    """The variants ``rounds`` times, every other round reversed (A B, B A, A B...)."""
    order: list[str] = []
    for index in range(rounds):
        order += variants if index % 2 == 0 else variants[::-1]
    return order


def run_variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; use {', '.join(VARIANTS)}")
    for variant in variant_order(variants, max(1, args.rounds)):
        if variant.startswith("monai") and not has_monai():
            print(f"{variant}: skipped (monai and torch are not installed)", flush=True)
            continue
        try:
            done = subprocess.run(child_command(args, variant), capture_output=True, text=True, env=env,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{variant}: stopped after {args.timeout:.0f} s", flush=True)
            continue
        if done.returncode != 0:
            print(f"{variant}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["started_order"] = len(results)
        results.append(result)
        print_result(result, args.peak_tflops)
    return results


def has_monai() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("monai", "torch"))


def print_result(r: dict[str, Any], peak_tflops: float | None = None) -> None:
    share = ""
    if peak_tflops:
        tflops = r["patches_per_second"] * r["gflop_per_patch"] / 1e3
        share = f"  {tflops:.1f} TFLOP/s = {100 * tflops / peak_tflops:.1f} % of {peak_tflops:g}"
    print(
        f"{r['variant']:<12} {r['backend']:<10} {r['precision']:<5} {r['device']:<6} patches {r['patches']:>4}  "
        f"model {r['model_seconds_per_patch']:.3f} s/patch  total {r['total_seconds']:.1f} s  "
        f"overhead x{r['overhead_ratio']:.3f} (in-run model {r['in_run_model_seconds_per_patch']:.3f} s/patch: "
        f"x{r['in_run_overhead_ratio']:.4f})  {r['voxels_per_second'] / 1e6:.3f} Mvoxel/s  "
        f"{r['patches_per_second']:.2f} patches/s  peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB{share}",
        flush=True,
    )


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: the sum of its runs' totals (several rounds: A B B A); ratios between variants."""
    by: dict[str, dict[str, float]] = {}
    for r in results:
        entry = by.setdefault(r["variant"], {"runs": 0, "total": 0.0, "model": 0.0, "rss": 0.0})
        entry["runs"] += 1
        entry["total"] += r["total_seconds"]
        entry["model"] += r["in_run_model_seconds_per_patch"] * r["patches"]
        entry["rss"] = max(entry["rss"], r["peak_rss_bytes"])
    summary: dict[str, Any] = {"variants": by}
    for variant, entry in by.items():
        if entry["runs"] > 1:
            print(f"{variant}: {entry['runs']} runs, {entry['total']:.1f} s in all, overhead over in-run model time "
                  f"x{entry['total'] / entry['model']:.4f}, peak RSS {entry['rss'] / 2**30:.2f} GiB")
    for precision in ("fp32", "bf16"):
        ours, theirs = by.get(f"engine-{precision}"), by.get(f"monai-{precision}")
        if ours and theirs and ours["runs"] == theirs["runs"]:
            ratio = theirs["total"] / ours["total"]
            summary[f"monai_over_engine_{precision}"] = ratio
            print(f"MONAI / engine ({precision}): time x{ratio:.3f}, "
                  f"peak RSS x{theirs['rss'] / ours['rss']:.3f}")
    fp32 = [r for r in results if r["variant"] == "engine-fp32"]
    bf16 = [r for r in results if r["variant"] == "engine-bf16"]
    if fp32 and bf16:
        total = sum(r["total_seconds"] for r in fp32) / len(fp32) / (sum(r["total_seconds"] for r in bf16) / len(bf16))
        model = fp32[0]["model_seconds_per_patch"] / bf16[0]["model_seconds_per_patch"]
        summary["bf16_speedup"] = total
        print(f"bf16 speed-up over fp32: total x{total:.2f}, model x{model:.2f}")
    return summary


def demo_dice(args: argparse.Namespace) -> dict[str, Any]:
    """Segment the MNI template with the demo model in fp32 and bf16 (one process each); Dice of both."""
    code = (
        "import json, sys, time\n"
        "from UNet3DSegmentLib.runtime.tensorflow_setup import configure_tensorflow, import_tensorflow_quietly\n"
        "import_tensorflow_quietly()\n"
        "from UNet3DSegmentLib.engine.loading import load_model\n"
        "from UNet3DSegmentLib.engine.bundled_models import default_model_path\n"
        "from UNet3DSegmentLib.training.demo import load_template\n"
        "from UNet3DSegmentLib.engine.pipeline import SegmentOptions, segment_images\n"
        "import numpy as np, SimpleITK as sitk\n"
        "configure_tensorflow('cpu')\n"
        "precision = sys.argv[1]\n"
        "image, reference = load_template()\n"
        "loaded = load_model(default_model_path(), precision=precision)\n"
        "start = time.perf_counter()\n"
        "result = segment_images([image], loaded, SegmentOptions(overlap=%r, precision=precision))\n"
        "seconds = time.perf_counter() - start\n"
        "labels = sitk.GetArrayFromImage(result.labels)\n"
        "np.save(sys.argv[2], labels)\n"
        "ref = sitk.GetArrayViewFromImage(reference)\n"
        "dice = {int(k): float(2 * ((labels == k) & (ref == k)).sum() / ((labels == k).sum() + (ref == k).sum()))"
        " for k in range(1, loaded.num_classes)}\n"
        "print(json.dumps({'precision': loaded.precision, 'seconds': seconds, 'patches': result.patches,"
        " 'dice': dice}))\n"
    ) % args.overlap
    out, folder = {}, Path(tempfile.mkdtemp(prefix="bench_dice_"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for precision in ("fp32", "bf16"):
        done = subprocess.run([sys.executable, "-c", code, precision, str(folder / f"{precision}.npy")],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        out[precision] = json.loads(done.stdout.strip().splitlines()[-1])
        r = out[precision]
        print(f"demo model {precision}: {r['patches']} patches, {r['seconds']:.1f} s, Dice "
              + ", ".join(f"{k}: {v:.4f}" for k, v in r["dice"].items()), flush=True)
    a, b = np.load(folder / "fp32.npy"), np.load(folder / "bf16.npy")
    change = {k: out["bf16"]["dice"][k] - out["fp32"]["dice"][k] for k in out["fp32"]["dice"]}
    agreement = float((a == b).mean())
    print("Dice change bf16 - fp32: " + ", ".join(f"{k}: {v:+.4f}" for k, v in change.items())
          + f"; voxels with the same label: {agreement:.5f}; speed-up x{out['fp32']['seconds'] / out['bf16']['seconds']:.2f}")
    return {"runs": out, "dice_change": change, "label_agreement": agreement}


def memory_check() -> dict[str, Any]:
    """The 512x512x400 int16 CT through the command line with a tiny 64^3 model: peak RSS."""
    import SimpleITK as sitk

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))
    import copy

    from conftest import TINY_CARD, save_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    card = copy.deepcopy(TINY_CARD)
    card["input"]["patch_size"] = [64, 64, 64]
    card["network"]["base_filters"] = 1
    model = save_tiny_model(folder / "model", card=card, name="ct")
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1500, (400, 512, 512), dtype=np.int16))
    image.SetSpacing((0.7, 0.7, 1.0))
    sitk.WriteImage(image, str(folder / "ct.nrrd"), False)
    del image
    probe = (
        "import resource, sys, time\n"
        "from UNet3DSegmentLib.cli.main import main\n"
        "start = time.perf_counter()\n"
        f"code = main(['segment', {str(folder / 'ct.nrrd')!r}, '-o', {str(folder / 'labels.nrrd')!r}, '--model',"
        f" {str(model)!r}, '--overlap', '0', '--batch-size', '4', '--progress', 'none'])\n"
        "print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - start)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    code, rss_kib, seconds = done.stdout.split()[-3:]
    result = {"exit_code": int(code), "peak_rss_bytes": int(rss_kib) * 1024, "seconds": float(seconds)}
    print(f"512x512x400 int16 CT, 4 classes, tiny 64^3 model, overlap 0: exit {code}, peak RSS "
          f"{result['peak_rss_bytes'] / 1e9:.2f} GB, {result['seconds']:.0f} s", flush=True)
    return result


def oom_check_child(args: argparse.Namespace) -> dict[str, Any]:
    """On a GPU with PyTorch: force out-of-memory with the allocator's cap and check the fallback.

    1. No cap: the sliding window with batch 8 gives the reference labels; the memory reserved for
       batches of 1, 2 and 8 patches is measured.
    2. Cap between what 2 and 8 patches need: batch 8 fails, the predictor halves its batches (warnings),
       and the labels equal the reference.
    3. Cap at what the weights alone hold: not even one patch fits, the run moves to the CPU (float32
       copy of the model) and the labels agree with the reference (GPU bf16/TF32 vs CPU float32).
    """
    import torch

    from UNet3DSegmentLib.runtime.fallback import FallbackPredictor
    from UNet3DSegmentLib.engine.window import sliding_window_predict

    loaded = load_predictor(args, "bf16")
    if not loaded.device.startswith("gpu") or loaded.backend != "torch":
        raise SystemExit("--oom-check needs --backend torch and a CUDA GPU")
    patch = loaded.patch_size
    shape = shape_of(args.shape)
    image = np.random.default_rng(0).normal(size=shape + (loaded.in_channels,)).astype(np.float32)
    index = torch.cuda.current_device()
    total_memory = torch.cuda.get_device_properties(index).total_memory

    def reserved_for(rows: int) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        loaded.predict(np.repeat(image[None, : patch[0], : patch[1], : patch[2]], rows, axis=0))
        return int(torch.cuda.max_memory_reserved())

    need = {rows: reserved_for(rows) for rows in (1, 2, 8)}

    def run(cap: int | None) -> tuple[np.ndarray, list[str], float, str]:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else cap / total_memory, index)
        warnings: list[str] = []
        predictor = FallbackPredictor(loaded.predict, loaded.device, loaded.cpu_predictor, warnings.append)
        start = time.perf_counter()
        probabilities = sliding_window_predict(image, predictor, patch_size=patch, overlap=args.overlap,
                                               blend="gaussian", batch_size=8)
        return probabilities, warnings, time.perf_counter() - start, predictor.device

    reference, _, reference_seconds, _ = run(None)
    halving_cap = (need[2] + need[8]) // 2
    halved, halving_warnings, halving_seconds, halving_device = run(halving_cap)
    torch.cuda.empty_cache()
    weights_only = int(torch.cuda.memory_reserved()) + 2**20
    moved, cpu_warnings, cpu_seconds, cpu_device = run(weights_only)
    torch.cuda.set_per_process_memory_fraction(1.0, index)
    labels = reference.argmax(-1)
    return {
        "reserved_bytes_for_batch": need,
        "reference_seconds": reference_seconds,
        "halving": {"cap_bytes": halving_cap, "warnings": halving_warnings, "seconds": halving_seconds,
                    "device_at_end": halving_device,
                    "label_agreement": float((halved.argmax(-1) == labels).mean()),
                    "max_probability_difference": float(np.abs(halved - reference).max())},
        "cpu": {"cap_bytes": weights_only, "warnings": cpu_warnings, "seconds": cpu_seconds,
                "device_at_end": cpu_device,
                "label_agreement": float((moved.argmax(-1) == labels).mean()),
                "max_probability_difference": float(np.abs(moved - reference).max())},
    }


def jax_oom_check_child(args: argparse.Namespace) -> dict[str, Any]:
    """On a GPU with JAX, started with a tiny ``XLA_PYTHON_CLIENT_MEM_FRACTION``: the fallback for real.

    JAX fixes its memory cap at start, so there is one capped run: the reference is the sliding
    window on the float32 CPU copy itself; the capped GPU run must fail at every batch size, move to
    that copy, and give exactly the reference.
    """
    from UNet3DSegmentLib.runtime.fallback import FallbackPredictor
    from UNet3DSegmentLib.engine.window import WindowConfig, sliding_window_predict

    loaded = load_predictor(args, "bf16")
    if not loaded.device.startswith("gpu") or loaded.backend != "jax":
        raise SystemExit("--oom-check --backend jax needs a GPU that JAX sees")
    patch = loaded.patch_size
    image = np.random.default_rng(0).normal(size=shape_of(args.shape) + (loaded.in_channels,)).astype(np.float32)
    cpu = loaded.cpu_predictor()
    window = WindowConfig(patch_size=patch, overlap=args.overlap, blend="gaussian", batch_size=args.batch_size)
    reference = sliding_window_predict(image, cpu.predict, window)
    warnings: list[str] = []
    predictor = FallbackPredictor(loaded.predict, loaded.device, loaded.cpu_predictor, warnings.append)
    start = time.perf_counter()
    capped = sliding_window_predict(image, predictor, window)
    return {"memory_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), "warnings": warnings,
            "device_at_end": predictor.device, "seconds": time.perf_counter() - start,
            "identical_to_cpu_reference": bool(np.array_equal(capped, reference))}


def oom_check(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`oom_check_child` (or the JAX one) in a child process and print what happened."""
    if args.backend == "jax":
        env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("UNET3D_JAX_FRACTION", "0.003"))
        result = child_result(args, "oom", env=env)
        print(f"JAX, memory fraction {result['memory_fraction']}: ended on {result['device_at_end']}, "
              f"{result['seconds']:.1f} s, warnings: {result['warnings']}; identical to the CPU copy's own "
              f"window: {result['identical_to_cpu_reference']}", flush=True)
        return result
    result = child_result(args, "oom")
    need = ", ".join(f"{rows}: {size / 2**20:.0f} MiB" for rows, size in result["reserved_bytes_for_batch"].items())
    print(f"GPU memory reserved per batch size (patches: MiB): {need}; "
          f"reference run {result['reference_seconds']:.1f} s")
    for step in ("halving", "cpu"):
        r = result[step]
        print(f"cap {r['cap_bytes'] / 2**20:.0f} MiB: ended on {r['device_at_end']}, {r['seconds']:.1f} s, "
              f"warnings: {r['warnings']}", flush=True)
        print("  " + ", ".join(f"{k} {v}" for k, v in r.items() if k.startswith(("labels", "label_", "max_"))))
    return result


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child and args.child.startswith("same-"):
        print(json.dumps(same_process_child(args)))
        return 0
    if args.child == "oom":
        print(json.dumps(jax_oom_check_child(args) if args.backend == "jax" else oom_check_child(args)))
        return 0
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    print(f"machine: {machine()}", flush=True)
    report: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv)}
    if args.memory_check:
        report["memory_check"] = memory_check()
    elif args.oom_check:
        report["oom_check"] = oom_check(args)
    elif args.same_process:
        report["same_process"] = same_process(args)
    elif args.demo_dice:
        report["demo_dice"] = demo_dice(args)
    else:
        report["results"] = run_variants(args)
        report["summary"] = summarise(report["results"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
