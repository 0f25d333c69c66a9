"""``unet3d-segment train``: train the seed 3D U-Net on image/label pairs; writes ``.keras`` + card."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

from ..base.errors import BadInputError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _patch(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or any(p < 8 or p % 8 for p in parts):
        raise argparse.ArgumentTypeError(f"patch must be one or three multiples of 8 (z,y,x), got {text}")
    return tuple(parts)  # type: ignore[return-value]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``train`` sub-command."""
    parser = subparsers.add_parser(
        "train",
        help="train a model on labelled volumes",
        description="Train the seed 3D U-Net on DATA: a folder with imagesTr/ and labelsTr/ (Decathlon / "
        "nnU-Net raw layout) or a CSV with image column(s) and a 'label' column. Writes OUTPUT (.keras) and "
        "its model card (.json) each time validation Dice improves, plus OUTPUT's .checkpoint/ folder for "
        "--resume.",
    )
    parser.add_argument("data", help="imagesTr/+labelsTr/ folder or CSV of pairs")
    parser.add_argument("-o", "--output", required=True, help="model to write (.keras); its card goes beside it")
    parser.add_argument("--card", help="model card to start from (channels, classes, spacing, normalisation)")
    parser.add_argument("--classes", help="comma-separated class names, background first "
                        "(default: from --card, else Background, Class 1.. up to the highest label)")
    parser.add_argument("--channels", default="image", help="comma-separated channel names (default: image)")
    parser.add_argument("--spacing", default="native", help="'native' or x,y,z mm to resample to (default native)")
    parser.add_argument("--normalization", default="zscore-nonzero",
                        choices=["zscore-nonzero", "percentile-zscore", "none"],
                        help="intensity normalisation (default zscore-nonzero); use --card for 'window'")
    parser.add_argument("--crop-to-nonzero", action="store_true", help="crop inputs to their non-zero box")
    parser.add_argument("--patch", type=_patch, default=(64, 64, 64), help="patch size z,y,x or one side (default 64)")
    parser.add_argument("--base-filters", type=_positive_int, default=16,
                        help="filters of the first level (seed: 32; default 16)")
    parser.add_argument("--epochs", type=_positive_int, default=20)
    parser.add_argument("--steps-per-epoch", type=_positive_int, default=50)
    parser.add_argument("--batch-size", type=_positive_int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of cases held out for validation (default 0.2)")
    parser.add_argument("--validation-patches", type=_positive_int, default=8)
    parser.add_argument("--foreground-probability", type=float, default=0.67,
                        help="share of patches centred on a foreground voxel (default 0.67)")
    parser.add_argument("--no-augmentation", action="store_true", help="no flips/rotations/intensity changes")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same run)")
    parser.add_argument("--mixed-precision", choices=["auto", "on", "off"], default="auto",
                        help="bfloat16 compute (auto: where the CPU or GPU supports it)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT's .checkpoint/ folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                        help="progress display: terminal bar, JSON lines on stdout, or none")
    parser.set_defaults(run=run)


class TrainingBar:
    """Progress bar of training steps on stderr, one line per validated epoch."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self._stream = stream
        self._width = width

    def __call__(self, event: dict) -> None:
        done, total = event.get("done", 0), event.get("total", 0)
        if event["stage"] == "train" and total:
            filled = int(self._width * done / total)
            elapsed = event["seconds"]
            eta = elapsed / done * (total - done) if done else 0.0
            bar = "#" * filled + "-" * (self._width - filled)
            self._stream.write(f"\r{event['message']} [{bar}] step {done}/{total}, loss {event.get('loss', 0):.3f}, "
                               f"{elapsed:.0f}s, ~{eta:.0f}s left")
        elif event.get("message"):
            self._stream.write(f"\r{event['message']}\033[K\n")
        self._stream.flush()


def card_data_from_args(args: argparse.Namespace, highest_label: Optional[int]) -> dict:
    """The starting model card: ``--card`` or one built from the options."""
    import json

    from ..engine.card import card_from_dict, load_card

    if args.card:
        data = load_card(args.card).to_dict()
    else:
        spacing: Any = args.spacing
        if spacing != "native":
            try:
                spacing = [float(v) for v in spacing.split(",")]
            except ValueError as error:
                raise BadInputError(f"--spacing must be 'native' or x,y,z in mm, got {args.spacing}") from error
        data = {
            "format_version": 1, "name": Path(args.output).stem, "version": "1.0.0",
            "description": f"Trained with unet3d-segment train on {args.data}.",
            "intended_use": "Research only; not for clinical use unless validated.",
            "input": {"channels": [c.strip() for c in args.channels.split(",")], "patch_size": list(args.patch),
                      "spacing": spacing, "orientation": "native",
                      "normalization": {"method": args.normalization}, "crop_to_nonzero": args.crop_to_nonzero},
            "classes": [], "training": {},
        }
    if args.classes:
        names = [n.strip() for n in args.classes.split(",")]
        data["classes"] = [{"name": n} for n in names]
    elif not data.get("classes"):
        if highest_label is None or highest_label < 1:
            raise BadInputError("cannot tell the classes: pass --classes or a --card")
        data["classes"] = [{"name": "Background" if i == 0 else f"Class {i}"} for i in range(highest_label + 1)]
    data["input"]["patch_size"] = list(args.patch)
    return json.loads(json.dumps(card_from_dict(data, source=args.card or "(options)").to_dict()))


def _highest_label(pairs: list) -> int:
    from ..engine.image_io import read_image
    import SimpleITK as sitk

    return max(int(sitk.GetArrayViewFromImage(read_image(p.label)).max()) for p in pairs)


def run(args: argparse.Namespace) -> int:
    """Find and check the pairs, preprocess them, train, and report the best validation Dice."""
    from ..training.augmentation import AugmentationConfig
    from ..training.datasets import find_pairs, load_case, split_pairs
    from ..engine.card import card_from_dict

    output = Path(args.output)
    if output.suffix != ".keras":
        raise BadInputError(f"--output must end in .keras, got {output.name}")
    if output.exists() and not (args.overwrite or args.resume):
        raise BadInputError(f"{output} exists; pass --overwrite to replace it or --resume to continue training")
    channels = len(load_card(args.card).input.channels) if args.card else len(args.channels.split(","))
    pairs = find_pairs(args.data, channels)
    if not pairs:
        raise BadInputError(f"no image/label pairs found in {args.data}")
    card_data = card_data_from_args(args, None if (args.classes or args.card) else _highest_label(pairs))
    card = card_from_dict(card_data)
    training_pairs, validation_pairs = split_pairs(pairs, args.validation_fraction, args.seed)

    from ..engine.loading import configure_tensorflow
    from ..training.loop import TrainConfig, train

    configure_tensorflow(args.device, threads=args.threads)
    reporter = TrainingBar() if args.progress == "bar" else args.reporter
    if reporter is not None:
        reporter({"stage": "load", "done": 0, "total": len(pairs), "seconds": 0.0,
                  "message": f"loading {len(training_pairs)} training and {len(validation_pairs)} validation case(s)"})
    training_cases = [load_case(p, card) for p in training_pairs]
    validation_cases = [load_case(p, card) for p in validation_pairs]
    config = TrainConfig(
        patch_size=tuple(args.patch), base_filters=args.base_filters, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, learning_rate=args.learning_rate,
        foreground_probability=args.foreground_probability, validation_patches=args.validation_patches,
        seed=args.seed, mixed_precision=args.mixed_precision,
        augmentation=AugmentationConfig(enabled=not args.no_augmentation),
    )
    command = "unet3d-segment train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "unet3d-segment train"
    info = {"command": command, "cases": {"training": [p.name for p in training_pairs],
                                          "validation": [p.name for p in validation_pairs]}}
    result = train(training_cases, validation_cases, card_data, output, config, resume=args.resume,
                   progress=reporter, cancel=args.cancel, extra_training_info=info)
    if args.progress == "bar":
        dice = ", ".join(f"{k} {v:.3f}" for k, v in result.best_dice.items())
        print(f"wrote {result.model_path} and {result.card_path.name} (best epoch {result.best_epoch}: {dice}; "
              f"{result.seconds:.0f} s, {result.precision})")
    elif args.progress == "json" and reporter is not None:
        reporter({"stage": "done", "done": 1, "total": 1, "seconds": round(result.seconds, 3),
                  "message": f"wrote {result.model_path}", "output": str(result.model_path),
                  "best_epoch": result.best_epoch, "dice": result.best_dice})
    return 0


def load_card(path: str) -> Any:
    """``model_card.load_card`` (imported lazily)."""
    from ..engine.card import load_card as _load

    return _load(path)
