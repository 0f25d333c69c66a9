"""``unet3d-segment batch``: segment a cohort (a folder of scans or a CSV of cases), model loaded once.

The work is ``engine/cohort.py`` ``segment_cohort`` (``engine/ray_engine.py`` for ``--engine ray``);
this module derives the flags from the declarations (``SegmentOptions``, ``BatchOptions``,
``JobOptions``) and maps the outcome to an exit code: 0 every case ok (or done earlier), 7 some
failed (results.csv says why), 5 cancelled (finished cases are kept and the table lists them; run
again to resume), 3 bad INPUT/OUTDIR or a resume under another model or options, 4 bad model.
"""

from __future__ import annotations

import argparse
import signal
import threading

from ..base.errors import EXIT_OK, EXIT_SOME_FAILED
from ..base.options import BatchOptions, JobOptions, SegmentOptions
from .arguments import add_options, check_inputs_exist, options_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``batch``: its flags come from ``BatchOptions``, ``SegmentOptions`` and ``JobOptions``."""
    parser = subparsers.add_parser(
        "batch",
        help="segment every case of a folder or CSV, the model loaded once",
        description="Segment every case of INPUT (a folder: each image file, nnU-Net _0000/_0001 channel "
        "groups and DICOM series folders are cases; or a CSV with a 'case' column and one column per "
        "model channel) into OUTDIR/<case>.<format>, with OUTDIR/results.csv (status, volumes in mL, "
        "confidence per case) and OUTDIR/summary.json. Cases already done are skipped unless --overwrite. "
        "Exit code 0: all cases ok; 7: some failed; 5: cancelled (finished cases are kept).",
    )
    parser.add_argument("input", metavar="INPUT", help="folder of scans, or CSV with case and channel columns")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if needed)")
    add_options(parser, JobOptions, only=["model"])
    add_options(parser, BatchOptions)
    add_options(parser, SegmentOptions)
    add_options(parser, JobOptions, only=["overwrite", "progress"],
                overwrite={"help": "recompute every case and replace its output (default: resume, skipping "
                           "cases whose output exists, is newer than its inputs and whose results.csv row "
                           "says ok; refused if the earlier run used another model or options)"})
    parser.set_defaults(run=run)


def _cancel_on_interrupt(cancel: threading.Event):
    """Ctrl+C sets the cancel event (as SIGTERM does), so the running cases stop cleanly; returns the
    handler it replaced (None: none was installed)."""
    if threading.current_thread() is threading.main_thread():
        try:
            return signal.signal(signal.SIGINT, lambda signum, frame: cancel.set())
        except (ValueError, OSError):
            pass
    return None


def run(args: argparse.Namespace) -> int:
    check_inputs_exist([args.input])
    options = options_from_args(args, SegmentOptions)
    batch = options_from_args(args, BatchOptions)
    if batch.engine == "ray":
        from ..engine.ray_engine import import_ray

        import_ray()  # not installed: one line naming the install command, exit 3
    from ..engine.cohort import segment_cohort

    previous = _cancel_on_interrupt(args.cancel)
    try:
        result = segment_cohort(args.input, args.output, model=args.model, options=options, batch=batch,
                                overwrite=args.overwrite, progress=args.reporter, cancel=args.cancel)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if args.progress == "bar":
        print(f"{result.count('ok')} ok, {result.count('skipped')} skipped, {result.count('error')} failed "
              f"in {result.seconds:.1f} s; {result.results_path}")
    return EXIT_OK if result.all_ok else EXIT_SOME_FAILED
