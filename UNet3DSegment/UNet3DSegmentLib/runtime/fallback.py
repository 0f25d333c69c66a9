"""Out-of-memory fallback around a predictor: smaller batches first, then the CPU, then give up.

A GPU that runs out of memory mid-run should cost time, not the run: :class:`FallbackPredictor`
catches :class:`OutOfMemoryError` from the predictor, halves the number of patches per model call
(splitting each batch the sliding window hands it) down to one, then switches to a CPU predictor when
one is given, and says so through ``warn`` (the pipeline turns that into a ``"warning"`` progress
event). Only when one patch on the CPU does not fit does the error reach the caller.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..base.errors import OutOfMemoryError

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
            except OutOfMemoryError as error:
                self._step_down(batch.shape[0], error)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if self.rows is None or n <= self.rows:
            return self._predict(batch)
        parts = [self._predict(batch[first:first + self.rows]) for first in range(0, n, self.rows)]
        return np.concatenate(parts, axis=0)

    def _step_down(self, n: int, error: OutOfMemoryError) -> None:
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
                f"out of memory on {self.device} even with 1 patch per model call; use a smaller patch "
                "size, close other programs, or use another device"
            ) from error
        self._warn(f"out of memory on {self.device} with 1 patch per model call; continuing on the CPU (slower)")
        self._predict, self.device, self.rows = cpu, "cpu", None
