"""Import TensorFlow without its native start-up chatter on stderr.

TensorFlow's C++ runtime prints several lines (oneDNN notice, "could not find cuda drivers", ...) to
file descriptor 2 while it loads, before ``TF_CPP_MIN_LOG_LEVEL`` takes effect. The command line's
contract is one clear line on stderr per error, and the Slicer module shows the child's last stderr
line to the user, so the import runs with descriptor 2 sent to a temporary file. If the import fails,
what TensorFlow printed is put back on stderr, so nothing useful is hidden.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any


def import_tensorflow_quietly() -> Any:
    """Import and return ``tensorflow`` with native start-up logs suppressed.

    Device discovery (which prints CUDA errors on machines without a driver) runs inside the same
    silenced block; it is cached by TensorFlow and does not yet create the runtime context, so thread
    and device settings can still be applied afterwards.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tf
