"""``unet3d-segment web``: serve the browser front end (trame-slicer) on this machine.

Needs the ``web`` extra (``pip install 'unet3dsegment[web]'``: trame-slicer with its own
slicer-core). trame and Slicer are imported inside ``run`` only, so ``--help`` stays instant and the
engine's command line works without them. Binds 127.0.0.1 unless ``--host`` says otherwise: the page
starts processes on the server, so expose it only on trusted networks. Each launch makes a random token
and prints the address to open with it (``http://127.0.0.1:PORT/?secret=TOKEN``); requests without it,
or from another origin, are refused (``web/guard.py``). The page chooses among the bundled model,
``--model`` and the models in ``--models-dir``, never a typed path, and never trusts a SavedModel.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ..base.errors import BadInputError, BadModelError
from ..base.options import JobOptions, WebOptions
from .arguments import add_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``web`` sub-command."""
    parser = subparsers.add_parser(
        "web",
        help="serve the browser front end (needs the 'web' extra)",
        description="Serve a web page (trame-slicer) to load a volume or the demo MRI, segment it with a model "
        "in a child process, view the result in slice and 3D views and download it as .seg.nrrd.",
    )
    add_options(parser, WebOptions, only=["host", "port"])
    add_options(parser, JobOptions, only=["model"], model={"help": "preselected model (default: the bundled demo model)"})
    add_options(parser, WebOptions, only=["models_dir", "max_upload_mb", "demo_downsample"])
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Start the server; returns when it stops (Ctrl+C, SIGTERM)."""
    if args.model is not None and not Path(args.model).exists():
        raise BadModelError(f"model {args.model} not found; pass an existing .keras/.h5 file or SavedModel folder")
    if args.models_dir is not None and not Path(args.models_dir).is_dir():
        raise BadModelError(f"--models-dir {args.models_dir} is not a folder; pass the folder that holds your models")
    try:
        from trame.app import get_server
        from trame.app.asynchronous import create_task

        from ..web.app import UNet3DSegmentWebApp
    except ImportError as error:
        raise BadInputError(
            f"the web front end needs trame-slicer ({error}); install it with pip install 'unet3dsegment[web]'"
        ) from error

    # trame reads sys.argv for its own options: give it none, ours are passed explicitly below.
    sys.argv = sys.argv[:1]
    server = get_server("unet3dsegment-web", client_type="vue3")
    app = UNet3DSegmentWebApp(server=server, model=args.model, demo_downsample=args.demo_downsample,
                              max_upload_mb=args.max_upload_mb, models_dir=args.models_dir, host=args.host)
    cancel = getattr(args, "cancel", None)

    def announce(**_) -> None:
        # The only way in: this address carries the launch's token (kept as a cookie by the browser).
        print(f"unet3d-segment web: open {app.guard.url(server.port, args.host)}", flush=True)

    async def stop_on_cancel() -> None:
        # cli.main turns SIGTERM into args.cancel: stop the server then (the app ends its job on close).
        while cancel is not None and not cancel.is_set():
            await asyncio.sleep(0.25)
        await server.stop()

    tasks = []  # asyncio holds tasks only weakly
    server.controller.on_server_ready.add(announce)
    if cancel is not None:
        server.controller.on_server_ready.add(lambda **_: tasks.append(create_task(stop_on_cancel())))
    try:
        server.start(host=args.host, port=args.port, open_browser=False, timeout=0, show_connection_info=False)
    finally:
        app.close()
    return 0
