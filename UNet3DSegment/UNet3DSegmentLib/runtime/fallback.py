"""Out-of-memory fallback around a predictor: smaller batches first, then the CPU, then give up.

A GPU that runs out of memory mid-run should cost time, not the run: :class:`FallbackPredictor`
catches any out-of-memory error of the predictor (:class:`OutOfMemoryError`, and what
``is_out_of_memory`` recognises: Python's ``MemoryError``, TensorFlow's ``ResourceExhaustedError``,
...), halves the number of patches per model call (splitting each batch the sliding window hands it)
down to one, then switches to a CPU predictor when one is given and halves again there, and says so
through ``warn`` (the pipeline turns that into a ``"warning"`` progress event). Only when one patch
does not fit on the last device does the error reach the caller, with advice for that device (on
the CPU never "use --device cpu").
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..base.errors import OutOfMemoryError, is_out_of_memory

Predictor = Callable[[np.ndarray], np.ndarray]


class FallbackPredictor:
    """A predictor that retries smaller, then on the CPU, when ``predict`` runs out of memory.

    ``cpu_fallback`` returns the CPU predictor when first needed (None: there is no other device);
    ``warn`` receives one line per fallback step. ``rows`` (patches per model call after fallbacks,
    None while unlimited) and ``device`` tell what is in effect.
    """

    def __init__(
        self,
        predict: Predictor,
        device: str = "cpu",
        cpu_fallback: Optional[Callable[[], Optional[Predictor]]] = None,
        warn: Optional[Callable[[str], None]] = None,
    ) -> None:
        self._predict = predict
        self._cpu_fallback = cpu_fallback
        self._warn = warn or (lambda message: None)
        self.device = device
        self.rows: Optional[int] = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        while True:
            try:
                return self._run(batch)
            except Exception as error:  # noqa: BLE001 - every framework has its own out-of-memory type
                if not is_out_of_memory(error):
                    raise
                self._step_down(batch.shape[0], error)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if self.rows is None or n <= self.rows:
            return self._predict(batch)
        parts = [self._predict(batch[first:first + self.rows]) for first in range(0, n, self.rows)]
        return np.concatenate(parts, axis=0)

    def _step_down(self, n: int, error: Exception) -> None:
        """Halve the patches per call; at one, move to the CPU; with nowhere left to go, re-raise."""
        rows = min(self.rows or n, n)
        if rows > 1:
            self.rows = rows // 2
            self._warn(
                f"out of memory on {self.device} with {rows} patches per model call; "
                f"retrying with {self.rows}"
            )
            return
        cpu = self._cpu_fallback() if self._cpu_fallback is not None and self.device != "cpu" else None
        if cpu is None:
            raise OutOfMemoryError(
                out_of_memory_advice(self.device, "even with 1 patch per model call", smaller_batch=False)
            ) from error
        self._warn(f"out of memory on {self.device} with 1 patch per model call; continuing on the CPU (slower)")
        self._predict, self.device, self.rows = cpu, "cpu", None


def out_of_memory_advice(device: Optional[str], what: str, smaller_batch: bool = True) -> str:
    """The one-line out-of-memory message for ``device`` (``"cpu"``, ``"gpu:N"``; None: not known).

    On the CPU there is no other device to suggest: fewer patches per call (``smaller_batch``), other
    programs closed, a model with a smaller patch or more memory. On a GPU the CPU is the way out.
    """
    batch = "lower --batch-size, " if smaller_batch else ""
    if device and device != "cpu":
        return f"out of memory on {device} {what}; close other programs using the GPU, {batch}or run with --device cpu"
    where = "on the CPU " if device == "cpu" else ""
    return (f"out of memory {where}{what}; close other programs, {batch}or use a model with a smaller patch size "
            "or a machine with more memory")
