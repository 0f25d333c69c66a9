"""``unet3d-segment demo``: segment the MNI152 T1 (or your own T1) with the bundled brain-tissue model."""

from __future__ import annotations

import argparse
from pathlib import Path

from .segment import _overlap
from ..base.errors import BadInputError


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
    parser.add_argument("--model", type=Path, help="model .keras (default: the bundled demo model)")
    parser.add_argument("--overlap", type=_overlap, default=0.5, help="tile overlap in [0, 1) (default 0.5)")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                        help="progress display: terminal bar, JSON lines on stdout, or none")
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
    from ..engine.loading import configure_tensorflow
    from ..engine.pipeline import SegmentOptions

    configure_tensorflow(args.device, threads=args.threads)
    result = run_demo(args.output_dir, args.input, args.reference, args.model, SegmentOptions(overlap=args.overlap),
                      progress=args.reporter, cancel=args.cancel)
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
