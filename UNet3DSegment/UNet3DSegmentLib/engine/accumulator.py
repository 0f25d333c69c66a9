"""Bounded-memory blending: weighted sums of tile outputs over a ring of z rows, not the whole volume.

Tiles come z slowest (``tiling.grid_starts``), so once a batch starts at row ``z`` every row above
it is final: :class:`SlabAccumulator` keeps only the rows still open (:func:`ring_depth` of them) and
hands finished rows out as averages. On machines with many cores the additions run in y bands on a
thread pool (:func:`blend_threads`), bit-for-bit equal to one thread. Pure numpy.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np

from ..runtime.cpu import cpu_cores
from .tiling import Start


def ring_depth(starts: Sequence[Start], rows: int, patch_z: int, size_z: int) -> int:
    """Rows along z the accumulator must hold so that every run of up to ``rows`` tiles fits into it.

    Before a run is added, every voxel above its first tile's z start is final (tiles come z-slowest),
    so the rows still open span from that start to the run's last tile's start plus the patch. Runs
    are any ``rows`` consecutive starts (batches, and the runs of skipped empty tiles between them,
    which need not align with batches), so the largest spread over every such window bounds them all.
    """
    depth = patch_z
    for first in range(len(starts)):
        last = min(first + rows, len(starts)) - 1
        depth = max(depth, starts[last][0] - starts[first][0] + patch_z)
    return min(depth, size_z)


def _ring_pieces(first: int, stop: int, depth: int) -> list[tuple[slice, slice]]:
    """(ring rows, local rows) pairs covering absolute rows ``first:stop`` of a ring of ``depth``."""
    start, length = first % depth, stop - first
    if start + length <= depth:
        return [(slice(start, start + length), slice(0, length))]
    head = depth - start
    return [(slice(start, depth), slice(0, head)), (slice(0, length - head), slice(head, length))]


class SlabAccumulator:
    """Weighted sums of tile outputs over a ring of ``depth`` z rows (not the whole volume).

    Rows are addressed by their absolute z; row ``z`` lives at ``z % depth``, so finished rows are
    taken out (divided by their weight sum) and cleared without moving the others. Outputs sum in
    ``dtype`` (float32, or float16 to halve the largest buffer); weights always sum in float32.

    ``pool`` (a thread pool with ``bands`` workers) splits each batch's additions into bands along y,
    so that several cores blend at once; each voxel still gets its tiles' terms in the same order, so
    the sums are bit-for-bit those of one thread. On a GPU the blending otherwise limits the speed.
    """

    def __init__(
        self,
        depth: int,
        shape_yx: tuple[int, int],
        classes: int,
        dtype: np.dtype,
        pool: Optional[ThreadPoolExecutor] = None,
        bands: int = 1,
    ) -> None:
        self.depth = depth
        self.sums = np.zeros((depth,) + tuple(shape_yx) + (classes,), dtype=dtype)
        self.weights = np.zeros((depth,) + tuple(shape_yx), dtype=np.float32)
        self._pool = pool if bands > 1 else None
        self._bands = _band_edges(shape_yx[0], bands if self._pool is not None else 1)
        self._class_weights: Optional[np.ndarray] = None
        self._class_weights_of: Optional[np.ndarray] = None  # the weights it was made from

    @property
    def nbytes(self) -> int:
        return self.sums.nbytes + self.weights.nbytes

    def add(self, prediction: np.ndarray, starts: Sequence[Start], weights: np.ndarray) -> None:
        """Add each tile's ``prediction * weights`` (``prediction`` is weighted in place)."""
        np.multiply(prediction, self._weights_per_class(weights, prediction.shape[4])[np.newaxis], out=prediction)
        if self._pool is None:
            self._add_band(prediction, starts, weights, 0, self.sums.shape[1])
            return
        jobs = [self._pool.submit(self._add_band, prediction, starts, weights, low, high)
                for low, high in self._bands]
        for job in jobs:
            job.result()

    def add_background(self, starts: Sequence[Start], weights: np.ndarray, passes: int = 1) -> None:
        """Add tiles the model did not run on (all-zero input) as certain background: class 0 gets
        ``weights * passes`` (one term per test-time pass, as a prediction sums its passes)."""
        pz, py, px = weights.shape
        background = weights * np.float32(passes) if passes != 1 else weights
        for z, y, x in starts:
            for ring, local in _ring_pieces(z, z + pz, self.depth):
                self.sums[ring, y:y + py, x:x + px, 0] += background[local]
                self.weights[ring, y:y + py, x:x + px] += weights[local]

    def _weights_per_class(self, weights: np.ndarray, classes: int) -> np.ndarray:
        """``weights`` repeated along a last axis of ``classes`` (contiguous: a flat, fast multiply)."""
        if self._class_weights is None or self._class_weights_of is not weights:
            shape = weights.shape + (classes,)
            self._class_weights = np.ascontiguousarray(np.broadcast_to(weights[..., np.newaxis], shape))
            self._class_weights_of = weights
        return self._class_weights

    def _add_band(self, prediction: np.ndarray, starts: Sequence[Start], weights: np.ndarray, low: int,
                  high: int) -> None:
        """The additions of every tile in ``starts`` that fall in rows ``low:high`` along y."""
        pz, py, px = weights.shape
        for i, (z, y, x) in enumerate(starts):
            top, bottom = max(y, low), min(y + py, high)
            if top >= bottom:
                continue
            inside = slice(top - y, bottom - y)
            for ring, local in _ring_pieces(z, z + pz, self.depth):
                self.sums[ring, top:bottom, x:x + px] += prediction[i, local, inside]
                self.weights[ring, top:bottom, x:x + px] += weights[local, inside]

    def take(self, first: int, stop: int, passes: int = 1) -> np.ndarray:
        """Rows ``first:stop`` as float32 weighted averages (sums / (weights * passes)); then cleared."""
        out = np.empty((stop - first,) + self.sums.shape[1:], dtype=np.float32)
        for ring, local in _ring_pieces(first, stop, self.depth):
            weight = self.weights[ring] if passes == 1 else self.weights[ring] * np.float32(passes)
            np.divide(self.sums[ring], weight[..., np.newaxis], out=out[local])
            self.sums[ring] = 0
            self.weights[ring] = 0
        return out


def _band_edges(size: int, bands: int) -> list[tuple[int, int]]:
    """``bands`` near-equal ``(low, high)`` ranges covering ``0:size`` (fewer if ``size`` is small)."""
    bands = max(1, min(bands, size))
    edges = [round(size * k / bands) for k in range(bands + 1)]
    return [(low, high) for low, high in zip(edges, edges[1:]) if high > low]


def blend_threads(cores: Optional[int] = None) -> int:
    """Threads for blending: one per 4 cores, at most 4 (one on small machines, whose cores run the model)."""
    if cores is None:
        cores = cpu_cores()
    return max(1, min(4, cores // 4))
