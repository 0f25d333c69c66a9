"""A stand-in engine child for the module harness: speaks the engine's JSON-lines protocol, no TensorFlow.

Run as ``PythonSlicer -m UNet3DSegmentLib segment IN... -o OUT ... --progress json``; the scenario comes
from ``FAKE_ENGINE`` (``ok``, ``slow``, ``hang``, ``bad_input``, ``bad_model``, ``oom``, ``crash``,
``killed``, ``phantom``, ``selftest``, ``warn`` (an input-check warning); ``noid`` for the warm protocol); its argv is appended as one JSON line to ``FAKE_ENGINE_LOG`` when set. ``ok`` writes a
labelmap on the first input's grid: 0 below the 40th intensity percentile, then classes 1, 2, 3 by
thirds of the rest.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

EXIT_CODES = {"bad_input": 3, "bad_model": 4, "oom": 6}


def emit(stage: str, done: int = 0, total: int = 0, **extra) -> None:
    print(json.dumps({"stage": stage, "done": done, "total": total, "seconds": round(time.monotonic() - START, 3),
                      **extra}), flush=True)


def parse(argv: list[str]) -> tuple[list[str], str]:
    args = argv[argv.index("segment") + 1:]
    inputs, output, index = [], "", 0
    while index < len(args):
        if args[index] == "-o":
            output, index = args[index + 1], index + 2
        elif args[index].startswith("--"):
            index += 2 if index + 1 < len(args) and not args[index + 1].startswith("--") else 1
        else:
            inputs.append(args[index])
            index += 1
    return inputs, output


def write_labels(source: str, output: str) -> None:
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(source)
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    low = np.percentile(values, 40)
    labels = np.zeros(values.shape, np.uint8)
    above = values > low
    if above.any():
        cuts = np.percentile(values[above], [33.3, 66.7])
        labels[above] = 1 + np.digitize(values[above], cuts).astype(np.uint8)
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(image)
    sitk.WriteImage(result, output + ".part.nrrd")
    os.replace(output + ".part.nrrd", output)


def statistics(argv: list[str], output: str) -> list:
    """The engine's own per-class figures of the written labelmap (what its ``done`` event carries)."""
    import SimpleITK as sitk
    from UNet3DSegmentLib.engine.card import card_for_model, default_card
    from UNet3DSegmentLib.engine.statistics import compute_statistics

    model = argv[argv.index("--model") + 1] if "--model" in argv else None
    card = (card_for_model(model) if model else None) or default_card()
    labels = sitk.ReadImage(output)
    return compute_statistics(sitk.GetArrayFromImage(labels), labels.GetSpacing(), card)


def write_phantom(source: str, output: str) -> None:
    """The phantom's own reference labels on the input's grid: what a perfect model would return."""
    import SimpleITK as sitk
    from UNet3DSegmentLib.client.phantom import brain_phantom

    labels = sitk.GetImageFromArray(brain_phantom()[1].astype("uint8"))
    labels.CopyInformation(sitk.ReadImage(source))
    sitk.WriteImage(labels, output)


def run(scenario: str, argv: list[str], request: dict) -> int:
    """One segmentation as ``segment`` would run it; returns its exit code (events carry ``request``)."""
    if scenario == "selftest":  # the module's self-test: its cancel test asks for --tta
        scenario = "hang" if "--tta" in argv else "phantom"
    inputs, output = parse(["segment"] + argv)
    print(f"fake engine: {scenario} run on {len(inputs)} input(s)", file=sys.stderr, flush=True)
    emit("load", message="model loaded", **request)
    if scenario in EXIT_CODES:
        message = {"bad_input": "input volume is empty; load a volume with image data",
                   "bad_model": "model card lists 3 classes but the model outputs 4; fix the card",
                   "oom": "out of memory on the GPU at batch 1; use the CPU device"}[scenario]
        emit("error", kind=scenario, message=message, exit_code=EXIT_CODES[scenario], **request)
        print(f"unet3d-segment: error: {message}", file=sys.stderr, flush=True)
        return EXIT_CODES[scenario]
    if scenario == "crash":
        print("Traceback (most recent call last):\nZeroDivisionError: division by zero", file=sys.stderr, flush=True)
        return 1
    if scenario == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if scenario == "hang":
        def terminate(signum, frame):
            print("fake engine: cancelled, cleaning up", file=sys.stderr, flush=True)
            sys.exit(5)
        signal.signal(signal.SIGTERM, terminate)
        emit("inference", 1, 50, **request)
        while True:
            time.sleep(0.05)
    emit("preprocess", message="normalised", **request)
    for done in range(1, 5):
        if scenario == "slow":
            time.sleep(0.15)
        emit("inference", done, 4, **request)
    emit("postprocess", **request)
    emit("write", message=output, **request)
    (write_phantom if scenario == "phantom" else write_labels)(inputs[0], output)
    warnings = ["channel T1: background is not zero; skull-strip the input"] if scenario == "warn" else []
    for text in warnings:
        emit("warning", message=text, check="input", **request)
    emit("done", 4, 4, output=output, statistics=statistics(argv, output), warnings=warnings, **request)
    return 0


def serve(scenario: str) -> int:
    """The warm engine's protocol: ``ready``, then one request per stdin line, ``stopped`` at end of input."""
    emit("ready", message="model loaded", pid=os.getpid())
    for line in sys.stdin:
        request = json.loads(line)
        if scenario == "noid":  # a failure the server cannot tie to the request it was reading
            emit("error", kind="bad-input", message="request is not JSON; send one object per line", exit_code=3,
                 id=None)
            continue
        code = run(scenario, request["argv"], {"id": request["id"]})
        if code == 1:
            emit("error", kind="internal", message="ZeroDivisionError: division by zero", exit_code=1,
                 id=request["id"])
    emit("stopped", reason="end of input")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "-c":  # a probe (what is installed?): plain Python answers it
        os.execv(sys.executable, [sys.executable] + sys.argv[1:])
    scenario = os.environ.get("FAKE_ENGINE", "ok")
    if os.environ.get("FAKE_ENGINE_LOG"):
        with open(os.environ["FAKE_ENGINE_LOG"], "a", encoding="utf-8") as log:
            log.write(json.dumps(sys.argv[1:]) + "\n")
    if "serve" in sys.argv[1:4]:
        return serve(scenario)
    return run(scenario, sys.argv[sys.argv.index("segment") + 1:], {})


START = time.monotonic()
if __name__ == "__main__":
    sys.exit(main())
