"""Stand-in for Slicer's ``PythonSlicer``: a CTK AppLauncher in front of ``python-real``.

Usage: ``python_slicer_launcher.py ARGS...`` (or the ``PythonSlicer`` wrapper next to this file) runs
``<python-real> ARGS...`` and behaves the way the real launcher does towards its parent. The
interpreter it starts is ``$UNET3D_FAKE_PYTHON_REAL`` when set (tests point it at a link named
``python-real``), else the interpreter running this script. Standard library only.

What the real launcher does, from commontk/AppLauncher (commit dcb7a7e95e52, 2026-07-20):

* ``Base/ctkAppLauncher.cpp``, ``ctkAppLauncherPrivate::runProcess``: python-real is started with
  ``QProcess::start`` (not detached), with ``QProcess::ForwardedChannels`` when no splash screen
  is shown (so the child writes straight to the launcher's stdout/stderr, i.e. it inherits them)
  and ``ForwardedInputChannel``. PythonSlicer shows no splash (its
  ``PythonSlicerLauncherSettings.ini`` has ``launcherNoSplashScreen=true``, as quoted by Slicer's
  maintainers on discourse.slicer.org).
* Nothing in the repository calls ``setsid``/``setpgid`` or a child-process modifier, and a
  non-detached ``QProcess::start`` keeps the child in the launcher's process group, so a signal
  sent to the group reaches python-real as well as the launcher.
* ``ctkAppLauncherPrivate::applicationFinished``: on ``QProcess::NormalExit`` the launcher exits
  with the child's exit code; on ``QProcess::CrashExit`` (the child was ended by a signal) it calls
  ``reportError("[<ApplicationToLaunch>] exit abnormally - Report the problem.")`` and exits with
  ``EXIT_FAILURE`` (1). ``reportError`` writes ``"error: " + msg`` and a newline to ``std::cerr``.
* No signal handler is installed anywhere (no ``signal``/``sigaction`` in the sources; ``Main.cpp``
  only builds a ``QCoreApplication``/``QApplication``), so SIGTERM/SIGINT keep their default
  disposition: the launcher dies at once and forwards nothing to python-real.

This script re-creates that behaviour independently (it shares no code with CTK).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def main(arguments: list[str]) -> int:
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(number, signal.SIG_DFL)  # a C++ program's dispositions: die, forward nothing
    python_real = os.environ.get("UNET3D_FAKE_PYTHON_REAL") or sys.executable
    try:
        child = subprocess.Popen([python_real, *arguments])  # same group, inherited stdin/stdout/stderr
    except OSError:
        print(f"error: Application does NOT exist [{python_real}]", file=sys.stderr, flush=True)
        return 1
    returncode = child.wait()
    if returncode < 0:  # ended by a signal: QProcess::CrashExit
        print(f"error: [{python_real}] exit abnormally - Report the problem.", file=sys.stderr, flush=True)
        return 1
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
