"""``unet3d-segment segment``: segment one volume (one file or DICOM folder per model channel)."""

from __future__ import annotations

import argparse

from ..base.errors import BadInputError


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


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _size(text: str) -> int:
    from ..base.errors import UNet3DSegmentError
    from ..engine.memory import parse_size

    try:
        return parse_size(text)
    except UNet3DSegmentError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with ``estimate``: precision, backend, memory budget, accumulation, GPU memory limit."""
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="arithmetic of the network (default auto: bf16 on GPUs and on CPUs with "
                        "AVX512-BF16/AMX, else fp32); the softmax output stays float32")
    parser.add_argument("--backend", choices=["tensorflow", "torch", "jax"], default="tensorflow",
                        help="Keras backend that runs the model (default tensorflow; torch and jax are "
                        "optional installs)")
    parser.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                        help="budget such as 4G or 512M for the full-volume probability arrays, needed "
                        "only to resample or write probabilities (default: half the machine's memory); "
                        "above it the labelmap is resampled instead. Blending always works in z slabs")
    parser.add_argument("--accumulation", choices=["float32", "float16"], default="float32",
                        help="dtype of the blended class sums (float16 halves that buffer)")
    parser.add_argument("--gpu-memory-limit", type=_size, default=None, metavar="SIZE",
                        help="most GPU memory this run may take, such as 6G (tensorflow and torch backends; "
                        "default: what it needs). Beyond it the run retries with smaller batches, then on "
                        "the CPU")


def select_runtime(args: argparse.Namespace) -> str:
    """Choose the Keras backend (before Keras is imported) and configure its device; return the device."""
    from ..runtime.backends import backend_installed, select_backend
    from ..engine.loading import configure_runtime

    limit = getattr(args, "gpu_memory_limit", None)
    select_backend(args.backend, args.device, args.gpu, limit)
    if backend_installed("tensorflow"):  # Keras loads TensorFlow on every backend when it is there
        from ..runtime.tensorflow_setup import import_tensorflow_quietly

        import_tensorflow_quietly()
    return configure_runtime(args.device, threads=args.threads, gpu_index=args.gpu, gpu_memory_limit=limit)


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
    parser.add_argument("--gpu", type=_non_negative_int, default=None, metavar="N",
                        help="which GPU to use on a machine with several (default 0)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")
    add_runtime_arguments(parser)
    parser.add_argument("--probabilities", metavar="PATH", help="also write class probabilities here")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                        help="progress display: terminal bar, JSON lines on stdout, or none")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, choose the backend and device, then run the pipeline."""
    from pathlib import Path

    for item in args.inputs:
        if not Path(item).exists():
            raise BadInputError(f"input {item} does not exist; check the path")
    from ..engine.pipeline import SegmentOptions, segment_files

    select_runtime(args)
    options = SegmentOptions(
        overlap=args.overlap,
        batch_size=args.batch_size,
        blend=args.blend,
        tta=args.tta,
        largest_component=args.largest_component,
        precision=args.precision,
        accumulation=args.accumulation,
        max_memory=args.max_memory,
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
