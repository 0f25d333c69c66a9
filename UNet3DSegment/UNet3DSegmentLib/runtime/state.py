"""The device the framework was configured for: the one record of it in this process.

Threads, visible GPUs and memory limits can be set only before a framework starts, so they are set
once (``backends.configure_runtime``, or ``tensorflow_setup.configure_tensorflow`` directly) and the
outcome is kept here: the Keras backend, the checked request and the device it gave (``"cpu"`` or
``"gpu:N"``). Loading a model asks :func:`device_in_effect` (through ``backends.ensure_configured``)
instead of configuring again. No framework import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..base.options import SegmentOptions
from .cpu import cpu_cores


@dataclass(frozen=True)
class RuntimeRequest:
    """What the caller asked for, checked against the option declarations; ``threads`` resolved."""

    device: str
    threads: int  # intra-op threads: the given number, else all cores
    gpu_index: Optional[int]
    gpu_memory_limit: Optional[int]  # bytes

    @classmethod
    def checked(
        cls,
        device: Any = "auto",
        threads: Any = None,
        gpu_index: Any = None,
        gpu_memory_limit: Any = None,
    ) -> "RuntimeRequest":
        """The request with each value checked by ``SegmentOptions.spec(name).check`` (BadInputError)."""
        threads = SegmentOptions.spec("threads").check(threads)
        return cls(
            device=SegmentOptions.spec("device").check(device),
            threads=threads or cpu_cores(),
            gpu_index=SegmentOptions.spec("gpu_index").check(gpu_index),
            gpu_memory_limit=SegmentOptions.spec("gpu_memory_limit").check(gpu_memory_limit),
        )


class RuntimeState:
    """The last configuration applied in this process: Keras backend, request, and the device it gave."""

    def __init__(self) -> None:
        self.backend: Optional[str] = None
        self.request: Optional[RuntimeRequest] = None
        self.device: Optional[str] = None

    def record(self, backend: str, request: RuntimeRequest, device: str) -> str:
        """Remember a configuration (applied, or found in effect); returns ``device``."""
        self.backend, self.request, self.device = backend, request, device
        return device

    def same_as(self, backend: str, request: RuntimeRequest) -> Optional[str]:
        """The device of the recorded configuration if it was this very request, else None."""
        if self.backend == backend and self.request == request:
            return self.device
        return None

    def device_for(self, backend: str) -> Optional[str]:
        """The device in effect for ``backend``, or None when it was not configured yet."""
        return self.device if self.backend == backend else None


RUNTIME = RuntimeState()


def device_in_effect(backend: Optional[str] = None) -> Optional[str]:
    """``"cpu"`` or ``"gpu:N"`` as configured in this process (for ``backend`` when given), or None."""
    return RUNTIME.device if backend is None else RUNTIME.device_for(backend)
