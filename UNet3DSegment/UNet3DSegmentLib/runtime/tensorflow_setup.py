"""TensorFlow's start: imported without its native chatter on stderr, then threads and GPU set up.

TensorFlow's C++ runtime prints several lines (oneDNN notice, "could not find cuda drivers", ...) to
file descriptor 2 while it loads, before ``TF_CPP_MIN_LOG_LEVEL`` takes effect. The command line's
contract is one clear line on stderr per error, and the Slicer module shows the child's last stderr
line to the user, so the import runs with descriptor 2 sent to a temporary file. If the import fails,
what TensorFlow printed is put back on stderr, so nothing useful is hidden.

:func:`configure_tensorflow` must run before the first TensorFlow op: threading and visible GPUs
cannot change afterwards. It records what it applied in ``state.RUNTIME``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Any, Iterator, Optional, Sequence

from ..base.errors import BadInputError
from ..base.units import MIB
from .state import RUNTIME, RuntimeRequest

logger = logging.getLogger(__name__)

# Packages Keras imports only to support them (scikit-learn wrappers, pandas inputs, matplotlib image
# galleries) when they are installed: about 3-4 s of TensorFlow's start on 2 cores, unused by the engine.
KERAS_EXTRAS = ("sklearn", "pandas", "matplotlib")


def import_tensorflow_quietly() -> Any:
    """Import and return ``tensorflow`` with native start-up logs suppressed.

    Device discovery (which prints CUDA errors on machines without a driver) runs inside the same
    silenced block; it is cached by TensorFlow and does not yet create the runtime context, so thread
    and device settings can still be applied afterwards. Keras' optional extras are left out
    (:func:`without_keras_extras`).
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            with without_keras_extras():
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


@contextlib.contextmanager
def without_keras_extras(names: Sequence[str] = KERAS_EXTRAS) -> Iterator[None]:
    """Within: ``import`` of ``names`` (those not imported yet) fails, so Keras skips its optional support.

    TensorFlow imports Keras, and Keras imports scikit-learn, pandas and matplotlib.pyplot when they are
    installed (the demo's extras pull them in), each inside ``try/except ImportError``. Afterwards the
    packages import normally again (the demo's overlay imports matplotlib itself); only Keras' sklearn
    wrappers, pandas inputs and image gallery stay off in this process, and the engine uses none of them.
    """
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # Python's marker for "import fails"
    try:
        yield
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def configure_tensorflow(
    device: str = "auto",
    threads: Optional[int] = None,
    gpu_index: Optional[int] = None,
    gpu_memory_limit: Optional[int] = None,
) -> str:
    """Set TensorFlow's threads and visible GPU before any op runs; return the device used.

    Intra-op threads = ``threads`` (default: all cores) and inter-op threads = 1: TensorFlow's default
    thread pools gave random 2x slowdowns on 2 cores. ``device``: ``"cpu"`` hides every GPU, ``"gpu"``
    needs one (``BadInputError`` otherwise), ``"auto"`` takes a GPU when one is visible. ``gpu_index``
    picks among several GPUs; ``gpu_memory_limit`` (bytes) caps the memory TensorFlow takes on it
    (otherwise it grows as needed). Values are checked as the options ``device``, ``threads``,
    ``gpu_index`` and ``gpu_memory_limit`` declare. Returns ``"cpu"`` or ``"gpu:N"``. Calling again
    with the same request is free; once TensorFlow has started, a different request cannot be applied:
    it is logged and the device in effect is returned.
    """
    request = RuntimeRequest.checked(device, threads, gpu_index, gpu_memory_limit)
    known = RUNTIME.same_as("tensorflow", request)
    if known is not None:
        return known

    tf = import_tensorflow_quietly()
    gpus = tf.config.list_physical_devices("GPU")  # does not start TensorFlow's runtime
    chosen = None
    if request.device != "cpu" and gpus:
        index = 0 if request.gpu_index is None else request.gpu_index
        if index >= len(gpus):
            raise BadInputError(
                f"GPU index {index} does not exist: TensorFlow sees {len(gpus)} GPU(s) (0 to {len(gpus) - 1})"
            )
        chosen = index
    elif request.device == "gpu":
        raise BadInputError(
            "device gpu was requested but TensorFlow sees no GPU (CPU-only TensorFlow build, missing CUDA "
            "libraries or driver); use device cpu or auto, or install a GPU build of TensorFlow"
        )
    try:
        tf.config.threading.set_intra_op_parallelism_threads(request.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.set_visible_devices([] if chosen is None else [gpus[chosen]], "GPU")
        if chosen is not None and request.gpu_memory_limit is not None:
            # TensorFlow takes the limit in MiB; it is bytes everywhere else.
            limit = tf.config.LogicalDeviceConfiguration(memory_limit=request.gpu_memory_limit // MIB)
            tf.config.set_logical_device_configuration(gpus[chosen], [limit])
        elif chosen is not None:
            tf.config.experimental.set_memory_growth(gpus[chosen], True)
    except RuntimeError as error:  # TensorFlow already started: settings are fixed for this process
        in_effect = _visible_device(tf, gpus)
        logger.warning(
            "TensorFlow was already running, so device=%s threads=%s could not be applied (%s); using %s",
            request.device, request.threads, error, in_effect,
        )
        return RUNTIME.record("tensorflow", request, in_effect)  # warn once per request
    return RUNTIME.record("tensorflow", request, "cpu" if chosen is None else f"gpu:{chosen}")


def _visible_device(tf: Any, gpus: Sequence[Any]) -> str:
    """``"cpu"`` or ``"gpu:N"``: the GPU TensorFlow runs on now (the first visible one)."""
    visible = tf.config.get_visible_devices("GPU")
    if not visible:
        return "cpu"
    return f"gpu:{gpus.index(visible[0]) if visible[0] in gpus else 0}"
