"""``unet3d-segment segment``: segment one volume (one file or DICOM folder per model channel)."""

from __future__ import annotations

import argparse

from .errors import BadInputError


def _overlap(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"overlap must be >= 0 and < 1, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``segment`` sub-command."""
    parser = subparsers.add_parser(
        "segment",
        help="segment a volume with a model",
        description="Segment INPUT (one file or DICOM folder per model channel) and write a labelmap "
        "with exactly the input's geometry to OUTPUT (.seg.nrrd, .nrrd, .nii.gz, .nii or .mha).",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image file(s) or DICOM folder(s)")
    parser.add_argument("-o", "--output", required=True, help="output labelmap or .seg.nrrd")
    parser.add_argument("--model", help="model .keras/.h5/SavedModel folder (default: bundled demo model)")
    parser.add_argument("--overlap", type=_overlap, default=0.5, help="tile overlap in [0, 1) (default 0.5)")
    parser.add_argument("--batch-size", type=_positive_int, default=2, help="patches per model call (default 2)")
    parser.add_argument("--blend", choices=["gaussian", "constant"], default="gaussian",
                        help="how overlapping tiles are weighed (default gaussian)")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8x slower)")
    parser.add_argument("--largest-component", action="store_true",
                        help="keep only the largest connected component of each class")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="where the model runs (default auto: a GPU when TensorFlow sees one)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--probabilities", metavar="PATH", help="also write class probabilities here")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                        help="progress display: terminal bar, JSON lines on stdout, or none")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, configure TensorFlow, then run the pipeline."""
    from pathlib import Path

    for item in args.inputs:
        if not Path(item).exists():
            raise BadInputError(f"input {item} does not exist; check the path")
    from .model_io import configure_tensorflow
    from .pipeline import SegmentOptions, segment_files
    from .tf_runtime import import_tensorflow_quietly

    import_tensorflow_quietly()
    configure_tensorflow(args.device, threads=args.threads)
    options = SegmentOptions(
        overlap=args.overlap,
        batch_size=args.batch_size,
        blend=args.blend,
        tta=args.tta,
        largest_component=args.largest_component,
    )
    result = segment_files(
        args.inputs,
        args.output,
        model=args.model,
        options=options,
        progress=args.reporter,
        cancel=args.cancel,
        probabilities=args.probabilities,
        overwrite=args.overwrite,
    )
    if args.progress == "bar":
        print(f"wrote {result.output} ({result.patches} patches, {result.seconds:.1f} s)")
    return 0
