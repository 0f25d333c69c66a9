"""Which Keras backend runs the model (``--backend tensorflow|torch|jax``), and setting up its framework.

Keras 3 runs the same ``.keras`` file on TensorFlow, PyTorch or JAX. TensorFlow is the default and
the only required one; PyTorch (``pip install "unet3dsegment[torch]"``) is how Windows users, for
whom TensorFlow has no GPU build, run the model on an NVIDIA GPU. Keras reads ``KERAS_BACKEND`` once,
at its first import, so :func:`select_backend` must run before anything imports Keras; the command
line does this first thing. :func:`configure_runtime` then sets the framework's threads and device
(TensorFlow: ``tensorflow_setup.configure_tensorflow``; PyTorch: :func:`configure_torch`; JAX:
:func:`configure_jax`), and each records what it applied in ``state.RUNTIME``;
:func:`ensure_configured` gives the device in effect, configuring the defaults first if nobody did.
Nothing here imports a framework at module level.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Optional

from ..base.errors import BadInputError
from ..base.options import SegmentOptions
from .state import RUNTIME, RuntimeRequest
from .tensorflow_setup import configure_tensorflow

DEFAULT_BACKEND = SegmentOptions.spec("backend").default
_INSTALL = {
    "tensorflow": 'pip install tensorflow',
    "torch": 'pip install "unet3dsegment[torch]" (or: pip install torch)',
    "jax": 'pip install jax',
}
_JAX_NO_LIMIT = ("a GPU memory limit is not available on the jax backend; set XLA_PYTHON_CLIENT_MEM_FRACTION "
                 "(a fraction of the GPU's memory, e.g. 0.3) instead, or use the tensorflow or torch backend")


_BACKEND = SegmentOptions.spec("backend")


def backend_installed(name: str) -> bool:
    """True when the backend's framework can be imported (checked without importing it)."""
    return importlib.util.find_spec(_BACKEND.check(name)) is not None


def active_backend() -> Optional[str]:
    """The backend Keras runs on if Keras is imported, else None (nothing decided yet)."""
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    return str(keras.backend.backend())


def select_backend(
    name: str, device: str = "auto", gpu_index: Optional[int] = None, gpu_memory_limit: Optional[int] = None
) -> str:
    """Make Keras use backend ``name``; must run before Keras is first imported.

    Sets ``KERAS_BACKEND``. For PyTorch and JAX, whose device is chosen when they are imported, it
    also applies ``device="cpu"`` (hide the GPUs) and ``gpu_index`` here. JAX is told not to take 75 %
    of the GPU's memory up front (Slicer's 3D views need some). ``gpu_memory_limit`` (bytes) is applied
    later by ``configure_runtime``; JAX has no absolute limit, so it is refused there. Raises
    BadInputError when the framework is not installed, or when Keras already runs on another backend in
    this process.
    """
    name = _BACKEND.check(name)
    if gpu_memory_limit is not None and name == "jax":
        raise BadInputError(_JAX_NO_LIMIT)
    current = active_backend()
    if current is not None:
        if current != name:
            raise BadInputError(
                f"Keras already runs on the {current} backend in this process; the {name} backend must be "
                "chosen before Keras is imported (start a new process, or set KERAS_BACKEND)"
            )
        return name
    if not backend_installed(name):
        raise BadInputError(f"the {name} backend is not installed; install it with: {_INSTALL[name]}")
    os.environ["KERAS_BACKEND"] = name
    if name == "torch":
        if device == "cpu":
            os.environ["KERAS_TORCH_DEVICE"] = "cpu"
        elif gpu_index is not None:
            os.environ["KERAS_TORCH_DEVICE"] = f"cuda:{gpu_index}"
    elif name == "jax":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if device == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        elif gpu_index is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_index)
    return name


def requested_backend() -> str:
    """The backend Keras runs on, or will run on when imported (``KERAS_BACKEND``, default tensorflow)."""
    return active_backend() or os.environ.get("KERAS_BACKEND", DEFAULT_BACKEND)


def configure_runtime(
    device: str = "auto",
    threads: Optional[int] = None,
    gpu_index: Optional[int] = None,
    gpu_memory_limit: Optional[int] = None,
) -> str:
    """Configure the framework of the Keras backend chosen by ``KERAS_BACKEND``; return its device.

    TensorFlow: ``configure_tensorflow``. PyTorch: CPU threads, cuDNN autotuning and the memory cap
    (the GPU was chosen by :func:`select_backend`). JAX: the device it found (``gpu_index`` was
    applied by :func:`select_backend`; a memory limit is refused). ``gpu_memory_limit``: bytes this
    process may take on the GPU. The values are checked as their options declare (BadInputError).
    Returns ``"cpu"`` or ``"gpu:N"``; the result is kept in ``state.RUNTIME``.
    """
    request = RuntimeRequest.checked(device, threads, gpu_index, gpu_memory_limit)
    backend = requested_backend()
    if backend == "torch":
        return configure_torch(request.device, request.threads, request.gpu_memory_limit)
    if backend == "jax":
        if request.gpu_memory_limit is not None:
            raise BadInputError(_JAX_NO_LIMIT)
        return configure_jax(request.device)
    return configure_tensorflow(request.device, request.threads, request.gpu_index, request.gpu_memory_limit)


def ensure_configured() -> str:
    """The device in effect, configuring the backend's defaults (all cores, auto device) if nobody did."""
    device = RUNTIME.device_for(requested_backend())
    return device if device is not None else configure_runtime()


def configure_torch(
    device: str = "auto", threads: Optional[int] = None, gpu_memory_limit: Optional[int] = None
) -> str:
    """Set PyTorch's CPU threads and GPU options; return ``"cpu"`` or ``"gpu:N"`` (where Keras puts tensors).

    On a GPU: cuDNN's autotuner is switched on (every call has the same patch shape, so the fastest
    3-D convolution algorithm is found once), and ``gpu_memory_limit`` (bytes) caps what this process's
    caching allocator may take; beyond it PyTorch raises out-of-memory, which the sliding window's
    fallback handles (smaller batches, then the CPU).
    """
    request = RuntimeRequest.checked(device, threads, None, gpu_memory_limit)
    import torch

    torch.set_num_threads(request.threads)
    if request.device == "cpu":
        return RUNTIME.record("torch", request, "cpu")
    # Keras' torch backend puts tensors on KERAS_TORCH_DEVICE if set, else on CUDA when available.
    where = os.environ.get("KERAS_TORCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if where.startswith("cuda"):
        index = int(where.split(":")[1]) if ":" in where else 0
        torch.backends.cudnn.benchmark = True
        if request.gpu_memory_limit is not None:
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, request.gpu_memory_limit / total), index)
        return RUNTIME.record("torch", request, f"gpu:{index}")
    if request.device == "gpu":
        raise BadInputError("device gpu was requested but PyTorch sees no CUDA GPU; use device cpu or auto")
    return RUNTIME.record("torch", request, "cpu")


def configure_jax(device: str = "auto") -> str:
    """Return ``"cpu"`` or ``"gpu:0"``: where JAX runs (chosen at import by ``JAX_PLATFORMS``)."""
    request = RuntimeRequest.checked(device)
    import jax

    platform = jax.devices()[0].platform
    if platform == "gpu":
        return RUNTIME.record("jax", request, "gpu:0")
    if request.device == "gpu":
        raise BadInputError("device gpu was requested but JAX sees no GPU; use device cpu or auto")
    return RUNTIME.record("jax", request, "cpu")
