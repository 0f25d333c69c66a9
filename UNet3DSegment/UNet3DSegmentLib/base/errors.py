"""Error kinds of the engine and the process exit code each one maps to.

Every user-facing failure is one of these exceptions, raised with a one-line message that names the
problem and the fix. The command line turns each kind into its own exit code, so the Slicer module
(which runs the engine as a child process) can tell the user what went wrong without parsing text.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: unexpected exception
EXIT_USAGE = 2  # argparse's own code; no longer returned: a usage error is bad input (3), see cli/main.py
EXIT_BAD_INPUT = 3
EXIT_BAD_MODEL = 4
EXIT_CANCELLED = 5
EXIT_OUT_OF_MEMORY = 6
EXIT_SOME_FAILED = 7  # batch: some cases failed (their rows in results.csv say why); the others were written


class UNet3DSegmentError(Exception):
    """Base class: a failure the user can act on. ``exit_code`` is the command line's status."""

    exit_code: int = EXIT_INTERNAL
    kind: str = "error"


class BadInputError(UNet3DSegmentError, ValueError):
    """An input volume, option or output path is unusable (missing, unreadable, wrong grid...)."""

    exit_code = EXIT_BAD_INPUT
    kind = "bad-input"


class BadModelError(UNet3DSegmentError, ValueError):
    """A model file or model card is unusable or contradicts the other."""

    exit_code = EXIT_BAD_MODEL
    kind = "bad-model"


class CancelledError(UNet3DSegmentError):
    """The run was cancelled (cancel event set, SIGTERM or Ctrl+C); nothing was written."""

    exit_code = EXIT_CANCELLED
    kind = "cancelled"


class OutOfMemoryError(UNet3DSegmentError, MemoryError):
    """Memory ran out (host or GPU) even after the fallbacks."""

    exit_code = EXIT_OUT_OF_MEMORY
    kind = "out-of-memory"


EXIT_CODES: dict[str, int] = {
    "ok": EXIT_OK,
    "internal": EXIT_INTERNAL,
    "usage": EXIT_USAGE,
    BadInputError.kind: EXIT_BAD_INPUT,
    BadModelError.kind: EXIT_BAD_MODEL,
    CancelledError.kind: EXIT_CANCELLED,
    OutOfMemoryError.kind: EXIT_OUT_OF_MEMORY,
}


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure of any framework: TensorFlow's ResourceExhaustedError, PyTorch's
    OutOfMemoryError (CUDA) and CPU allocator error, JAX/XLA's RESOURCE_EXHAUSTED, Python's MemoryError,
    ITK's "Failed to allocate memory for image" (a RuntimeError from SimpleITK).

    Judged by type name and message, so that no framework has to be imported to ask.
    """
    text = str(error)
    return (
        isinstance(error, MemoryError)
        or type(error).__name__ in {"ResourceExhaustedError", "OutOfMemoryError"}
        or "RESOURCE_EXHAUSTED" in text
        or "out of memory" in text.lower()
        or "DefaultCPUAllocator: can't allocate memory" in text
        or "Failed to allocate memory" in text  # ITK (SimpleITK) image buffers
    )
