"""Dice against work for the sliding window's settings on the demo model (issue 15, part 1).

For the template and the held-out copies of ``training/demo.py`` it runs the engine's own pipeline
(``pipeline.segment_images``) once per setting: overlap 0.5 / 1/3 / 0.25, Gaussian or constant
blending, skipping all-zero tiles or not. The network's output for a tile depends only on the tile's
input, so each distinct tile runs once and later settings reuse its output (a cache keyed by the
tile's bytes); every setting still goes through the real tiling, blending, argmax and restoring code.
Printed per setting: the patches the model would run (the cost of the setting), Dice per class on the
template and the held-out copies, and the largest change of any class's Dice against the baseline
(overlap 0.5, Gaussian, no skipping: the engine's behaviour before this study).

    python benchmarks/overlap_study.py                  # template + 4 held-out copies, bundled model
    python benchmarks/overlap_study.py --noisy          # each also with 3 % background noise
    python benchmarks/overlap_study.py --copies 0 --no-crop --overlaps 0.25   # whole field of view: empty tiles
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = [(overlap, blend, skip) for overlap in (0.5, 1 / 3, 0.25) for blend in ("gaussian", "constant")
            for skip in (False, True)]
BASELINE = (0.5, "gaussian", False)


class TileCache:
    """A predictor that runs the model only on tiles it has not seen (same bytes, same output)."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray]) -> None:
        self.forward = forward
        self.outputs: dict[bytes, np.ndarray] = {}
        self.model_seconds = 0.0
        self.model_patches = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        keys = [hashlib.blake2b(np.ascontiguousarray(tile).tobytes(), digest_size=16).digest() for tile in batch]
        missing = [i for i, key in enumerate(keys) if key not in self.outputs]
        if missing:
            start = time.perf_counter()
            computed = self.forward(np.ascontiguousarray(batch[missing]))
            self.model_seconds += time.perf_counter() - start
            self.model_patches += len(missing)
            for i, output in zip(missing, computed):
                self.outputs[keys[i]] = np.array(output, dtype=np.float16)  # halves the cache; Dice unaffected
        return np.stack([self.outputs[key].astype(np.float32) for key in keys])


def volumes(noisy: bool, copies: int) -> list[tuple[str, Any, Any]]:
    """(name, image, reference) for the template and the first ``copies`` held-out copies."""
    from UNet3DSegmentLib.training.demo import (EVALUATION_SEEDS, load_template_maps, noisy_background,
                                                reference_labels, transformed_copy)

    maps = load_template_maps()
    sets = [("template", maps[0], reference_labels(*maps), 0)]
    sets += [(f"copy-{seed}", *transformed_copy(*maps, seed), seed) for seed in EVALUATION_SEEDS[:copies]]
    result = [(name, image, reference) for name, image, reference, _ in sets]
    if noisy:
        result += [(f"{name}-noise", noisy_background(image, seed=seed), reference)
                   for name, image, reference, seed in sets]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled demo model")
    parser.add_argument("--copies", type=int, default=4, help="held-out copies (default 4)")
    parser.add_argument("--noisy", action="store_true", help="also each volume with 3 %% background noise")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--no-crop", action="store_true",
                        help="run on the whole field of view (the card's crop_to_nonzero off): tiles of air")
    parser.add_argument("--overlaps", default=None, help="comma-separated overlaps (default 0.5,1/3,0.25)")
    args = parser.parse_args(argv)
    global SETTINGS, BASELINE
    if args.overlaps:
        overlaps = [float(v) for v in args.overlaps.split(",")]
        SETTINGS = [(o, b, k) for o in overlaps for b in ("gaussian", "constant") for k in (False, True)]
        BASELINE = (overlaps[0], "gaussian", False)

    import SimpleITK as sitk

    from bench_inference import machine
    from UNet3DSegmentLib.base.options import SegmentOptions
    from UNet3DSegmentLib.engine.bundled_models import default_model_path
    from UNet3DSegmentLib.engine.loading import load_model
    from UNet3DSegmentLib.engine.pipeline import segment_images
    from UNet3DSegmentLib.engine.postprocessing import dice_per_class
    from UNet3DSegmentLib.training.demo import CLASS_NAMES

    print(f"machine: {machine()}", flush=True)
    model = load_model(args.model or default_model_path())
    if args.no_crop:
        import dataclasses

        model.card = dataclasses.replace(model.card, input=dataclasses.replace(model.card.input, crop_to_nonzero=False))
    cache = TileCache(model._forward())
    model._function = cache
    classes = range(1, model.num_classes)
    rows: list[dict] = []
    for name, image, reference in volumes(args.noisy, args.copies):
        truth = sitk.GetArrayFromImage(reference)
        for overlap, blend, skip in SETTINGS:
            options = SegmentOptions(overlap=overlap, blend=blend, skip_empty=skip)
            result = segment_images([image], model, options)
            dice = dice_per_class(sitk.GetArrayViewFromImage(result.labels), truth, classes)
            rows.append({"volume": name, "overlap": round(overlap, 4), "blend": blend, "skip_empty": skip,
                         "patches": result.patches, **{CLASS_NAMES[k]: round(v, 5) for k, v in dice.items()}})
            print(json.dumps(rows[-1]), flush=True)
    names = [CLASS_NAMES[k] for k in classes]
    base = {row["volume"]: row for row in rows if (row["overlap"], row["blend"], row["skip_empty"])
            == (round(BASELINE[0], 4), BASELINE[1], BASELINE[2])}
    print(f"\nmodel ran {cache.model_patches} distinct tiles in {cache.model_seconds:.0f} s "
          f"({cache.model_seconds / max(1, cache.model_patches):.2f} s each)")
    header = "| overlap | blend | skip empty | patches (all volumes) | " + " | ".join(
        f"{n} template / held-out mean" for n in names) + " | largest Dice change |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    summary = []
    for overlap, blend, skip in SETTINGS:
        mine = [row for row in rows if (row["overlap"], row["blend"], row["skip_empty"]) == (round(overlap, 4), blend, skip)]
        change = max(abs(row[n] - base[row["volume"]][n]) for row in mine for n in names)
        signed = min((row[n] - base[row["volume"]][n] for row in mine for n in names), key=abs, default=0.0)
        worst = min(row[n] - base[row["volume"]][n] for row in mine for n in names)
        cells = []
        for n in names:
            template = [row[n] for row in mine if row["volume"] == "template"]
            held = [row[n] for row in mine if row["volume"].startswith("copy-") and not row["volume"].endswith("-noise")]
            cells.append(f"{template[0]:.4f} / {np.mean(held):.4f}" if held else f"{template[0]:.4f}")
        patches = sum(row["patches"] for row in mine)
        print(f"| {overlap:.2f} | {blend} | {'yes' if skip else 'no'} | {patches} | " + " | ".join(cells)
              + f" | {change:.4f} (worst {worst:+.4f}) |")
        summary.append({"overlap": overlap, "blend": blend, "skip_empty": skip, "patches": patches,
                        "largest_change": change, "worst_change": worst, "smallest_change": signed})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), "rows": rows,
                                         "summary": summary, "distinct_tiles": cache.model_patches,
                                         "model_seconds": cache.model_seconds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
