"""A fake engine child for EngineProcess tests: the engine's JSON-lines and exit codes, no TensorFlow.

``fake_engine.py MODE ARGS...``; standard library only, so it starts in milliseconds and also runs
behind the stand-in ``PythonSlicer`` launcher (python_slicer_launcher.py).

Modes:
  ok OUTPUT                  progress, then ``done`` naming OUTPUT; exit 0
  exit CODE KIND MESSAGE     an ``error`` event of KIND, the message on stderr; exit CODE
  oom                        progress, an allocator warning on stderr, then SIGKILL to itself (what
                             the kernel's out-of-memory killer does)
  graceful WORKDIR SECONDS   writes WORKDIR/engine.tmp and WORKDIR/ready (its pid), then works until
                             SIGTERM; on SIGTERM it spends SECONDS cleaning up, removes engine.tmp,
                             writes WORKDIR/cleaned, reports ``cancelled`` and exits 5 (the engine's
                             cancel contract)
  stubborn WORKDIR           like graceful but ignores SIGTERM (only SIGKILL ends it)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def emit(**event: object) -> None:
    print(json.dumps(event, ensure_ascii=False), flush=True)


def progress(done: int, total: int) -> None:
    emit(stage="inference", done=done, total=total, seconds=0.01 * done, message=f"patch {done}/{total}")


def work_until_signalled(workdir: Path) -> None:
    temporary = workdir / "engine.tmp"
    temporary.write_text("partial result")
    (workdir / "ready.part").write_text(str(os.getpid()))
    os.replace(workdir / "ready.part", workdir / "ready")  # the test signals once this appears
    done = 0
    while True:
        done += 1
        progress(done, 10**6)
        time.sleep(0.05)


def main(mode: str, arguments: list[str]) -> int:
    if mode == "ok":
        emit(stage="load", done=0, total=0, seconds=0.0, message="reading")
        progress(1, 1)
        emit(stage="done", done=1, total=1, seconds=0.02, message="", output=arguments[0])
        return 0
    if mode == "exit":
        code, kind, message = int(arguments[0]), arguments[1], arguments[2]
        progress(1, 9)
        emit(stage="error", done=0, total=0, seconds=0.1, kind=kind, message=message, exit_code=code)
        print("unet3d-segment: error: " + message, file=sys.stderr, flush=True)
        return code
    if mode == "oom":
        emit(stage="load", done=0, total=0, seconds=0.0, message="reading")
        progress(1, 40)
        print("W external/local_tsl/tsl/framework/cpu_allocator_impl.cc:83] Allocation of 1073741824 "
              "exceeds 10% of free system memory.", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # not reached
        return 0
    if mode == "graceful":
        workdir, seconds = Path(arguments[0]), float(arguments[1])

        def on_term(signum: int, frame: object) -> None:
            time.sleep(seconds)  # cleaning up takes a while
            (workdir / "engine.tmp").unlink()
            (workdir / "cleaned").write_text(f"cleaned up after {signal.Signals(signum).name}")
            emit(stage="error", done=0, total=0, seconds=1.0, kind="cancelled",
                 message="cancelled; nothing was written", exit_code=5)
            sys.exit(5)

        signal.signal(signal.SIGTERM, on_term)
        work_until_signalled(workdir)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        work_until_signalled(Path(arguments[0]))
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
