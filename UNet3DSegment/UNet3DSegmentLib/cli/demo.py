"""``unet3d-segment demo``: segment the MNI152 T1 (or your own T1) with the bundled brain-tissue model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..base.errors import BadInputError
from ..base.options import JobOptions, SegmentOptions
from .arguments import add_options, options_from_args, start_runtime


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``demo`` sub-command."""
    parser = subparsers.add_parser(
        "demo",
        help="segment the MNI152 brain template with the bundled model",
        description="Segment the MNI152 T1 template shipped with nilearn (or --input, a skull-stripped T1) "
        "with the bundled brain-tissue demo model; write OUTPUT_DIR/<name>.seg.nrrd and "
        "OUTPUT_DIR/<name>_overlay.png and print per-class Dice against the reference labels.",
    )
    parser.add_argument("--input", type=Path, help="your own T1 volume instead of the template")
    parser.add_argument("--reference", type=Path, help="reference labels for --input (0 bg, 1 CSF, 2 GM, 3 WM)")
    parser.add_argument("--output-dir", type=Path, default=Path("demo-output"), help="default: demo-output")
    add_options(parser, JobOptions, only=["model"])
    add_options(parser, SegmentOptions, only=["overlap", "device", "threads"])
    add_options(parser, JobOptions, only=["progress"])
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the figures (in bar/none mode) or a final JSON event (json mode)."""
    if args.input is not None and not args.input.exists():
        raise BadInputError(f"input {args.input} does not exist; check the path")
    if args.reference is not None and args.input is None:
        raise BadInputError("--reference needs --input: the template's own reference labels are used otherwise")
    if args.reference is not None and not args.reference.exists():
        raise BadInputError(f"reference {args.reference} does not exist; check the path")
    from ..training.demo import run_demo

    options = options_from_args(args, SegmentOptions)
    start_runtime(options)
    model = Path(args.model) if args.model else None
    result = run_demo(args.output_dir, args.input, args.reference, model, options, progress=args.reporter,
                      cancel=args.cancel)
    if args.progress == "json":
        args.reporter({"stage": "done", "done": 1, "total": 1, "seconds": round(result.seconds, 3),
                       "message": f"wrote {result.segmentation}", "output": str(result.segmentation),
                       "overlay": str(result.overlay), "dice": result.dice, "patches": result.patches})
        return 0
    print(f"model: {result.model_name} (demonstration model, not for clinical use)")
    if result.dice is not None:
        print("Dice vs reference labels: " + ", ".join(f"{k} {v:.3f}" for k, v in result.dice.items()))
    else:
        print("Dice: no reference labels given (--reference LABELS)")
    print(f"{result.patches} patches in {result.seconds:.1f} s")
    print(f"wrote {result.segmentation}")
    print(f"wrote {result.overlay}")
    return 0
