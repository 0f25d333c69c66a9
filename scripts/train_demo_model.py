#!/usr/bin/env python
"""Reproduce the bundled brain-tissue demo model (Resources/Models/brain_tissue_demo.keras + .json).

Recipe (see UNet3DSegmentLib/demo.py for the data derivation):
1. reference labels from the MNI152 2009 symmetric T1 template and its GM/WM probability maps
   (nilearn's package data): inside the brain mask (T1 > 0), argmax of (1 - GM - WM, GM, WM);
2. transformed copies (random affine, bias field, gamma, intensity scale, noise) for training
   (seeds 1000+), validation (5000+) and evaluation (9000+): disjoint seed ranges; with
   ``--background-noise-probability p`` (default 0, as the bundled model was trained) a share p of the
   training and validation copies also enters with its zero background replaced by |offset + noise|
   (augmentation ``random_background_noise``, applied to the raw image before the engine's
   preprocessing, as an input with a noisy background is at inference);
3. training with UNet3DSegmentLib.training.loop (seed topology, Dice + cross-entropy, foreground
   over-sampling, per-patch flips / rotations / intensity augmentation, best validation checkpoint);
4. evaluation through the engine's own pipeline (``demo.evaluate_demo_model``) on the held-out copies
   and the untransformed template, each also with 3 % background noise; the per-class Dice figures
   go into the card's ``training``.

Usage (the bundled model's command; ~45 min on 2 CPU cores):
    python scripts/train_demo_model.py --output Resources/Models/brain_tissue_demo.keras
Evaluate an existing model only:
    python scripts/train_demo_model.py --output Resources/Models/brain_tissue_demo.keras --evaluate-only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from UNet3DSegmentLib.training.augmentation import AugmentationConfig  # noqa: E402
from UNet3DSegmentLib.training.demo import (  # noqa: E402
    EVALUATION_SEEDS,
    TRAIN_SEEDS,
    VALIDATION_SEEDS,
    background_noise_twins,
    demo_card_data,
    evaluate_demo_model,
    load_template_maps,
    transformed_copy,
    with_random_background_noise,
)

COMMAND = "python scripts/train_demo_model.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--output", type=Path, default=Path("Resources/Models/brain_tissue_demo.keras"))
    parser.add_argument("--train-copies", type=int, default=16)
    parser.add_argument("--validation-copies", type=int, default=2)
    parser.add_argument("--evaluation-copies", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--steps-per-epoch", type=int, default=30)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--validation-patches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--background-noise-probability", type=float, default=0.0,
                        help="share of training/validation copies that also enter with a noisy background "
                             "(0: the bundled model's recipe)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--evaluate-only", action="store_true")
    return parser.parse_args()


def make_cases(maps, seeds, card, prefix, augmentation):
    """Prepared copies for ``seeds``, plus background-noise twins of the chosen ones (raw image, then
    the engine's preprocessing: the twin is not cropped and is normalised with its background)."""
    from UNet3DSegmentLib.training.datasets import prepare_case

    twins = set(background_noise_twins(len(seeds), augmentation.background_noise_probability))
    cases = []
    for index, seed in enumerate(seeds):
        image, moved = transformed_copy(*maps, seed)
        cases.append(prepare_case(f"{prefix}-{seed}", [image], moved, card))
        if index in twins:
            noisy = with_random_background_noise(image, seed, augmentation)
            cases.append(prepare_case(f"{prefix}-{seed}-background-noise", [noisy], moved, card))
    return cases


def progress_printer():
    last = {"t": 0.0}

    def show(event: dict) -> None:
        now = time.time()
        if event["stage"] == "validate":
            print(f"[{event['seconds']:7.0f}s] {event['message']}", flush=True)
        elif now - last["t"] > 60:
            last["t"] = now
            print(f"[{event['seconds']:7.0f}s] step {event['done']}/{event['total']} {event['message']} "
                  f"loss {event.get('loss', 0):.3f}", flush=True)

    return show


def main() -> int:
    args = parse_args()
    from UNet3DSegmentLib.engine.card import card_from_dict, card_path_for_model, load_card, save_card
    from UNet3DSegmentLib.runtime.tensorflow_setup import configure_tensorflow
    from UNet3DSegmentLib.training.loop import TrainConfig, train

    configure_tensorflow("auto")  # all cores intra-op, one inter-op thread: before TensorFlow starts

    start = time.perf_counter()
    maps = load_template_maps()  # T1, GM, WM
    train_seeds = list(TRAIN_SEEDS[: args.train_copies])
    validation_seeds = list(VALIDATION_SEEDS[: args.validation_copies])
    evaluation_seeds = list(EVALUATION_SEEDS[: args.evaluation_copies])
    data_info = {
        "command": COMMAND,
        "data": ("MNI152 2009 symmetric T1 template + GM/WM probability maps shipped with nilearn "
                 "(mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz). Labels: inside the brain mask (T1 > 0) "
                 "argmax of (CSF = 1 - GM - WM, GM, WM), background outside. Training/validation/evaluation "
                 "images are transformed copies with disjoint seeds: one random affine (rotation <= 10 deg, "
                 "scale 0.9-1.1, translation <= 5 mm) moves the T1 (B-spline), the GM/WM maps and the brain "
                 "mask (linear, mask >= 0.5), labels re-derived by the same rule on the moved maps; then bias "
                 "field, gamma 0.75-1.35, intensity x0.5-2, noise <= 4 % inside the brain."
                 + (f" Background-noise twins: a share {args.background_noise_probability:g} of the training and "
                    "validation copies (augmentation background_noise_probability) also enters with its zero "
                    "background replaced by |offset + N(0, sigma)| (sigma 0-8 %, offset 0-2 % of the brain's "
                    "mean intensity), before the engine's preprocessing (no crop, z-score over the whole volume)."
                    if args.background_noise_probability > 0 else "")),
        "train_seeds": [train_seeds[0], train_seeds[-1]],
        "validation_seeds": [validation_seeds[0], validation_seeds[-1]],
        "evaluation_seeds": evaluation_seeds,
    }
    if not args.evaluate_only:
        card = card_from_dict(demo_card_data())
        augmentation = AugmentationConfig(flip_axes=(2,), rotation_probability=0.2, max_rotation_deg=10.0,
                                          scale_range=(0.9, 1.1),
                                          background_noise_probability=args.background_noise_probability)
        config = TrainConfig(
            patch_size=(args.patch,) * 3, base_filters=args.base_filters, epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch, learning_rate=args.learning_rate,
            validation_patches=args.validation_patches, seed=args.seed, mixed_precision=args.mixed_precision,
            augmentation=augmentation,
        )
        print(f"making {len(train_seeds)} training and {len(validation_seeds)} validation copies", flush=True)
        train_cases = make_cases(maps, train_seeds, card, "train", augmentation)
        validation_cases = make_cases(maps, validation_seeds, card, "validation", augmentation)
        print(f"{len(train_cases)} training and {len(validation_cases)} validation volumes (with background-noise "
              f"twins)", flush=True)
        print(f"data ready in {time.perf_counter() - start:.0f} s; training", flush=True)
        result = train(train_cases, validation_cases, demo_card_data(), args.output, config, resume=args.resume,
                       progress=progress_printer(), extra_training_info=data_info)
        print(f"trained in {result.seconds:.0f} s ({result.precision}); best epoch {result.best_epoch}: "
              f"{result.best_dice}", flush=True)
        del train_cases, validation_cases
        data_info["training_seconds"] = round(result.seconds, 1)
    evaluation = evaluate_demo_model(args.output, maps, evaluation_seeds, log=lambda line: print(line, flush=True))
    card_path = card_path_for_model(args.output)
    card = load_card(card_path)
    data = card.to_dict()
    fresh = demo_card_data()  # classes, wording: the current definitions, also for --evaluate-only
    data.update({k: fresh[k] for k in ("classes", "description", "intended_use")})
    data["training"].update({k: v for k, v in data_info.items() if k not in data["training"] or not args.evaluate_only})
    data["training"]["evaluation_dice"] = evaluation
    data["training"]["model_size_bytes"] = args.output.stat().st_size
    save_card(card_from_dict(data), card_path)
    print(json.dumps(evaluation["held_out_copies_mean"]), json.dumps(evaluation["held_out_background_noise_mean"]),
          f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
