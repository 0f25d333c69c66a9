"""``unet3d-segment estimate``: patches, memory and expected time of a run, without running it.

Reads the input (header for the grid, pixels only when the model card crops to the non-zero box),
loads the model for its size and compute, and prints the number of patches, the main memory buffers
and the expected inference time on the CPU (and the GPU when one is seen) from documented throughputs
(``engine/memory.py``). ``--measure`` times real patches on the chosen device instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..base.options import JobOptions, SegmentOptions
from .arguments import add_options, check_inputs_exist, options_from_args, start_runtime


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``estimate`` sub-command."""
    parser = subparsers.add_parser(
        "estimate",
        help="estimate patches, memory and time of a segmentation (dry run)",
        description="Print the number of patches, the expected peak memory and the expected inference "
        "time per device for segmenting INPUT with a model, without segmenting.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image file(s) or DICOM folder(s)")
    add_options(parser, JobOptions, only=["model"])
    add_options(parser, SegmentOptions, only=["overlap", "batch_size", "tta", "device", "gpu_index", "threads"],
                tta={"help": "count mirror test-time augmentation (8 passes)"})
    parser.add_argument("--probabilities", action="store_true", help="count writing the probabilities")
    parser.add_argument("--measure", action="store_true",
                        help="time a few real patches on the device instead of using documented throughputs")
    parser.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    add_options(parser, SegmentOptions, section="runtime", exclude=["device", "gpu_index", "threads"])
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Work out the estimate and print it (text, or JSON with ``--json``)."""
    check_inputs_exist(args.inputs)
    options = options_from_args(args, SegmentOptions)
    device = start_runtime(options)
    estimate = build_estimate(args, options, device)
    if args.json:
        print(json.dumps(estimate))
    else:
        print_estimate(estimate, sys.stdout)
    return 0


def build_estimate(args: argparse.Namespace, options: SegmentOptions, device: str) -> dict[str, Any]:
    """The estimate as a JSON-ready dict (see :func:`print_estimate` for its fields).

    ``args`` gives the inputs, the model and what to count; ``options`` how the run would go.
    """
    from pathlib import Path

    from ..engine.bundled_models import default_model_path
    from ..engine.image_io import read_channels
    from ..engine.accumulator import ring_depth
    from ..engine.tiling import count_patches, grid_starts
    from ..engine.memory import (
        activation_elements,
        budget_or_default,
        estimate_memory,
        expected_seconds_per_patch,
        largest_activation,
        model_flops,
        probability_bytes,
    )
    from ..engine.loading import load_model
    from ..runtime.cpu import cpu_cores, cpu_flags, cpu_has_bf16
    from ..runtime.precision import resolve_precision
    from ..engine.preprocessing import prepare

    loaded = load_model(Path(args.model) if args.model else default_model_path(), precision=options.precision)
    card = loaded.card
    images = read_channels([Path(p) for p in args.inputs])
    input_shape = tuple(reversed(images[0].GetSize()))
    input_bytes = sum(image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent() for image in images)
    work_shape = tuple(prepare(images, card).array.shape[:3])
    del images
    patch = loaded.patch_size
    padded = tuple(max(s, p) for s, p in zip(work_shape, patch))
    passes = 8 if options.tta else 1
    from ..engine.pipeline import card_overlap

    overlap = options.window_overlap(card_overlap(card))
    patches = count_patches(padded, patch, overlap) * passes
    rows = min(options.batch_size, patches)
    depth = ring_depth(grid_starts(padded, patch, overlap), rows, patch[0], padded[0])
    full = args.probabilities or card.input.spacing != "native"
    budget = budget_or_default(options.max_memory)
    full_bytes = probability_bytes(work_shape, card.num_classes) + probability_bytes(input_shape, card.num_classes)
    if full and not args.probabilities and full_bytes > budget:
        full = False  # the pipeline resamples labels instead
    memory = estimate_memory(
        input_shape, input_bytes, padded, card.in_channels, card.num_classes, depth, rows, patch,
        largest_activation(loaded.keras_model), loaded.keras_model.count_params(),
        accumulation_bytes=2 if options.accumulation == "float16" else 4, full_probabilities=full,
    )
    flops = model_flops(loaded.keras_model)
    activations = activation_elements(loaded.keras_model)
    flags = cpu_flags()
    cores = options.threads or cpu_cores()
    avx512 = "avx512f" in flags
    rows_out = []
    cpu_precision = resolve_precision(options.precision, "cpu", flags)
    devices = [("cpu", cpu_precision)]
    if device.startswith("gpu"):
        devices.append((device, resolve_precision(options.precision, device)))
    for name, precision in devices:
        per_patch = expected_seconds_per_patch(flops, name, precision, cores, avx512, activations, loaded.backend)
        rows_out.append({"device": name, "precision": precision, "seconds_per_patch": per_patch,
                         "seconds": per_patch * patches, "source": "documented throughput"})
    if args.measure:
        per_patch = measure_seconds_per_patch(loaded, rows)
        rows_out.insert(0, {"device": loaded.device, "precision": loaded.precision, "seconds_per_patch": per_patch,
                            "seconds": per_patch * patches, "source": "measured"})
    return {
        "input_shape_zyx": list(input_shape),
        "network_shape_zyx": list(work_shape),
        "patch_size": list(patch),
        "overlap": overlap,
        "patches": patches,
        "gflop_per_patch": round(flops / 1e9, 3),
        "cpu": {"cores": cores, "avx512": avx512, "bf16": cpu_has_bf16(flags)},
        "memory_bytes": {key: int(value) for key, value in vars(memory).items()} | {"total": memory.total},
        "memory_budget_bytes": budget,
        "accumulator_rows": int(depth),
        "times": rows_out,
        "model": str(loaded.path),
        "accumulation": options.accumulation,
    }


def measure_seconds_per_patch(loaded: Any, rows: int, repeats: int = 2) -> float:
    """Seconds per patch of the real predictor: one warm-up batch, then the mean of ``repeats``."""
    import numpy as np

    batch = np.random.default_rng(0).normal(size=(rows, *loaded.patch_size, loaded.in_channels)).astype(np.float32)
    loaded.predict(batch)
    start = time.perf_counter()
    for _ in range(repeats):
        loaded.predict(batch)
    return (time.perf_counter() - start) / (repeats * rows)


def print_estimate(estimate: dict[str, Any], stream: Any) -> None:
    """Human-readable lines of an estimate."""
    from ..base.units import format_duration, format_size
    from ..engine.memory import MemoryEstimate

    memory = estimate["memory_bytes"]
    parts = MemoryEstimate(**{k: v for k, v in memory.items() if k != "total"})
    shape = "x".join(map(str, estimate["network_shape_zyx"]))
    write = stream.write
    write(f"model: {estimate['model']} ({estimate['gflop_per_patch']:.1f} GFLOP per patch)\n")
    write(f"network grid (z, y, x): {shape}; patch {'x'.join(map(str, estimate['patch_size']))}, "
          f"overlap {estimate['overlap']}: {estimate['patches']} patches\n")
    write(f"memory (approximate peak): {format_size(memory['total'])} "
          f"(budget {format_size(estimate['memory_budget_bytes'])})\n")
    for line in parts.lines():
        write(line + "\n")
    write("expected inference time:\n")
    for row in estimate["times"]:
        write(f"  {row['device']:<6} {row['precision']:<5} {row['seconds_per_patch']:.3f} s/patch -> "
              f"{format_duration(row['seconds'])} ({row['source']})\n")
