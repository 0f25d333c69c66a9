"""``unet3d-segment segment``: segment one volume (one file or DICOM folder per model channel).

``add_segment_arguments`` and ``segment_from_args`` are shared with ``serve`` (``cli/serve.py``),
which parses each request with the same arguments and runs the same steps on a model it keeps loaded.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from ..base.options import JobOptions, SegmentOptions
from .arguments import add_options, check_inputs_exist, options_from_args, start_runtime


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``segment`` sub-command: its flags come from ``SegmentOptions`` and ``JobOptions``."""
    parser = subparsers.add_parser(
        "segment",
        help="segment a volume with a model",
        description="Segment INPUT (one file or DICOM folder per model channel) and write a labelmap "
        "with exactly the input's geometry to OUTPUT (.seg.nrrd, .nrrd, .nii.gz, .nii or .mha; .dcm: a "
        "DICOM SEG referencing the input series, for DICOM input, needs unet3dsegment[dicom]).",
    )
    add_segment_arguments(parser)
    parser.set_defaults(run=run)


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``segment`` (also those of each ``serve`` request)."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image file(s) or DICOM folder(s)")
    parser.add_argument("-o", "--output", required=True, help="output labelmap, .seg.nrrd, or .dcm (DICOM SEG)")
    add_options(parser, JobOptions, only=["model"])
    add_options(parser, SegmentOptions)
    parser.add_argument("--probabilities", metavar="PATH", help="also write class probabilities here")
    add_options(parser, JobOptions, only=["statistics", "overwrite", "progress"])


def segment_from_args(args: argparse.Namespace, loaded: Optional[Any] = None) -> Any:
    """Check the arguments and run the pipeline; returns its ``SegmentationResult``.

    Without ``loaded`` the backend and device are chosen here and the model is loaded; ``serve``
    passes the ``LoadedModel`` it keeps (its runtime was started once, with the same options).
    """
    check_inputs_exist(args.inputs)
    from ..engine.pipeline import segment_files

    options = options_from_args(args, SegmentOptions)
    from ..engine.loading import trust_models

    trust_models(options.trust_model)  # --trust-model: a SavedModel skips the safety check (engine/savedmodel_safety.py)
    if loaded is None:
        start_runtime(options)
    return segment_files(
        args.inputs,
        args.output,
        model=args.model,
        options=options,
        progress=args.reporter,
        cancel=args.cancel,
        probabilities=args.probabilities,
        overwrite=args.overwrite,
        loaded=loaded,
        statistics=args.statistics,
    )


def run(args: argparse.Namespace) -> int:
    """Check the arguments, choose the backend and device, then run the pipeline."""
    result = segment_from_args(args)
    if args.progress == "bar":
        print(f"wrote {result.output} ({result.patches} patches, {result.seconds:.1f} s)")
    return 0
