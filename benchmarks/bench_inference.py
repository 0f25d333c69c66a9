"""Sliding-window inference benchmark (not part of the test suite; results in BENCHMARKS.md).

For each variant it prints the per-patch model time (the compiled predictor alone), the total
sliding-window time, the overhead ratio total / (patches x per-patch time), voxels/s and the peak RSS.
Every variant runs in its own process, so that peak RSS and TensorFlow's thread setup belong to it.

Variants: ``engine-fp32``, ``engine-bf16`` (this engine's ``sliding_window_predict``), and, when
``monai`` and ``torch`` are installed, ``monai-fp32`` / ``monai-bf16``: MONAI's
``sliding_window_inference`` calling the same TensorFlow predictor with the same patch, overlap,
batch size and Gaussian blend (sigma = patch / 8).

    python benchmarks/bench_inference.py                       # 240x240x155, full seed net, overlap 0.5
    python benchmarks/bench_inference.py --shape 128,128,128   # reduced size (z, y, x)
    python benchmarks/bench_inference.py --demo-dice           # bf16 vs fp32 Dice on the demo model
    python benchmarks/bench_inference.py --memory-check        # 512x512x400 CT, tiny model: peak RSS
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
    parser.add_argument("--variants", default="engine-fp32,engine-bf16,monai-fp32",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--demo-dice", action="store_true", help="bf16 vs fp32 on the demo model and template")
    parser.add_argument("--memory-check", action="store_true", help="512x512x400 CT with a tiny model: peak RSS")
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
    """The engine's LoadedModel (compiled tf.function) for the benchmark model in ``precision``."""
    from UNet3DSegmentLib.model_io import configure_tensorflow, load_model
    from UNet3DSegmentLib.tf_runtime import import_tensorflow_quietly

    import_tensorflow_quietly()
    configure_tensorflow(args.device, threads=args.threads)
    if args.model:
        return load_model(Path(args.model), precision=precision)
    import keras

    from UNet3DSegmentLib.network import build_unet3d

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
    calls = {"patches": 0, "seconds": 0.0}

    def counted(array: np.ndarray) -> np.ndarray:
        calls["patches"] += array.shape[0]
        begin = time.perf_counter()
        result = loaded.predict(array)
        calls["seconds"] += time.perf_counter() - begin
        return result

    start = time.perf_counter()
    if kind == "engine":
        from UNet3DSegmentLib.inference import sliding_window_predict

        result = sliding_window_predict(image, counted, patch, args.overlap, "gaussian", args.batch_size)
        labels = result.argmax(-1)
    else:
        result = run_monai(image, counted, patch, args)
        labels = result.argmax(-1)
    total = time.perf_counter() - start
    patches = calls["patches"]
    return {
        "variant": args.child,
        "precision": loaded.precision,
        "device": loaded.device,
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
               "--base-filters", str(args.base_filters), "--patch", args.patch]
    if args.model:
        command += ["--model", args.model]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


def run_variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for variant in [v for v in args.variants.split(",") if v]:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; use {', '.join(VARIANTS)}")
        if variant.startswith("monai") and not has_monai():
            print(f"{variant}: skipped (monai and torch are not installed)", flush=True)
            continue
        done = subprocess.run(child_command(args, variant), capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"{variant}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print_result(result)
    return results


def has_monai() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("monai", "torch"))


def print_result(r: dict[str, Any]) -> None:
    print(
        f"{r['variant']:<12} {r['precision']:<5} {r['device']:<6} patches {r['patches']:>4}  "
        f"model {r['model_seconds_per_patch']:.3f} s/patch  total {r['total_seconds']:.1f} s  "
        f"overhead x{r['overhead_ratio']:.3f} (in-run model {r['in_run_model_seconds_per_patch']:.3f} s/patch: "
        f"x{r['in_run_overhead_ratio']:.4f})  {r['voxels_per_second'] / 1e6:.3f} Mvoxel/s  "
        f"{r['patches_per_second']:.2f} patches/s  peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB",
        flush=True,
    )


def summarise(results: list[dict[str, Any]]) -> None:
    by = {r["variant"]: r for r in results}
    for precision in ("fp32", "bf16"):
        ours, theirs = by.get(f"engine-{precision}"), by.get(f"monai-{precision}")
        if ours and theirs:
            print(f"MONAI / engine ({precision}): time x{theirs['total_seconds'] / ours['total_seconds']:.3f}, "
                  f"peak RSS x{theirs['peak_rss_bytes'] / ours['peak_rss_bytes']:.3f}")
    if "engine-fp32" in by and "engine-bf16" in by:
        fp32, bf16 = by["engine-fp32"], by["engine-bf16"]
        print(f"bf16 speed-up over fp32: total x{fp32['total_seconds'] / bf16['total_seconds']:.2f}, "
              f"model x{fp32['model_seconds_per_patch'] / bf16['model_seconds_per_patch']:.2f}")


def demo_dice(args: argparse.Namespace) -> dict[str, Any]:
    """Segment the MNI template with the demo model in fp32 and bf16 (one process each); Dice of both."""
    code = (
        "import json, sys, time\n"
        "from UNet3DSegmentLib.tf_runtime import import_tensorflow_quietly\n"
        "import_tensorflow_quietly()\n"
        "from UNet3DSegmentLib.model_io import configure_tensorflow, load_model\n"
        "from UNet3DSegmentLib.bundled_models import default_model_path\n"
        "from UNet3DSegmentLib.demo import load_template\n"
        "from UNet3DSegmentLib.pipeline import SegmentOptions, segment_images\n"
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
        "from UNet3DSegmentLib.cli import main\n"
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


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    print(f"machine: {machine()}", flush=True)
    report: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv)}
    if args.memory_check:
        report["memory_check"] = memory_check()
    elif args.demo_dice:
        report["demo_dice"] = demo_dice(args)
    else:
        report["results"] = run_variants(args)
        summarise(report["results"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
