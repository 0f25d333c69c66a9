"""``unet3d-segment train``: train the seed 3D U-Net on image/label pairs; writes ``.keras`` + card."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from ..base.errors import BadInputError
from ..base.options import JobOptions, SegmentOptions, TrainOptions
from .arguments import add_options, options_from_args, start_runtime


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
    add_options(parser, TrainOptions)
    add_options(parser, JobOptions, only=["overwrite"], overwrite={"help": "replace an existing OUTPUT"})
    add_options(parser, SegmentOptions, only=["device", "threads"])
    add_options(parser, JobOptions, only=["progress"])
    parser.set_defaults(run=run)


def card_data_from_args(args: argparse.Namespace, highest_label: Optional[int]) -> dict:
    """The starting model card: ``--card`` or one built from the options (``TrainOptions`` fields of ``args``)."""
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

    from ..training.loop import TrainConfig, train

    start_runtime(options_from_args(args, SegmentOptions))
    reporter = args.reporter
    if reporter is not None:
        reporter({"stage": "load", "done": 0, "total": len(pairs), "seconds": 0.0,
                  "message": f"loading {len(training_pairs)} training and {len(validation_pairs)} validation case(s)"})
    training_cases = [load_case(p, card) for p in training_pairs]
    validation_cases = [load_case(p, card) for p in validation_pairs]
    config = TrainConfig.from_options(options_from_args(args, TrainOptions))
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
