"""Turn input volumes into the network's input array as the model card asks, and map outputs back.

Forward (``prepare``): set NaN/Inf voxels to 0 (counted in ``PreparedInput.warnings``) -> reorient
(``sitk.DICOMOrient``) -> resample to the card's spacing (linear; same origin and direction, size =
round(extent / spacing); a grid beyond this machine's memory is an ``OutOfMemoryError`` naming it) ->
crop to the union non-zero box of all channels (1-voxel margin) -> normalise each channel -> stack to
float32 ``(z, y, x, channels)``.

Inverse (``PreparedInput.restore_*``): paste the crop back into the resampled grid, resample to the
reoriented input grid, undo the reorientation, and check that the result lies exactly on the
original input grid. When spacing and orientation are native and nothing is cropped, the forward
pass reads the pixels without copying them and the inverse returns the array it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..base.options import NORMALIZATIONS
from ..base.errors import BadInputError, BadModelError, OutOfMemoryError, UNet3DSegmentError, is_out_of_memory

Slices = Tuple[slice, slice, slice]
_GEOMETRY_TOLERANCE = 1e-6  # restored grid vs original grid (relative to the spacing)
_TINY_STD = 1e-8  # a channel with a smaller standard deviation is constant: divide by 1
_CHUNK = 1 << 22  # voxels per chunk when accumulating statistics in float64


@dataclass(frozen=True)
class Grid:
    """A voxel grid in ITK terms: size/spacing/origin in (x, y, z), direction row-major 3x3."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    @property
    def shape_zyx(self) -> Tuple[int, int, int]:
        return tuple(reversed(self.size))

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Give ``image`` (already of this size) this grid's spacing, origin and direction."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def difference(self, other: "Grid") -> Optional[str]:
        """A description of the first property in which ``other`` differs, or None if it matches."""
        if tuple(self.size) != tuple(other.size):
            return f"size {other.size} vs {self.size}"
        scale = max(self.spacing)
        for name, tolerance in (("spacing", scale), ("origin", scale), ("direction", 1.0)):
            mine, theirs = np.array(getattr(self, name)), np.array(getattr(other, name))
            if np.any(np.abs(mine - theirs) > _GEOMETRY_TOLERANCE * tolerance):
                return f"{name} {tuple(theirs)} vs {tuple(mine)}"
        return None


@dataclass
class PreparedInput:
    """The network input ``array`` (float32, (z, y, x, channels)) and what is needed to invert it."""

    array: np.ndarray
    _original: sitk.Image
    _original_orientation: Optional[str]  # orientation code to restore, None if not reoriented
    _oriented_grid: Grid  # input grid after reorientation (= input grid if not reoriented)
    _resampled_grid: Optional[Grid]  # grid at the card's spacing, None if not resampled
    _crop: Optional[Slices]  # (z, y, x) slices of the resampled grid, None if not cropped
    warnings: Tuple[str, ...] = ()  # one line per repair of the input (non-finite voxels set to 0)

    @property
    def original_image(self) -> sitk.Image:
        """The first input channel as given: its grid is the grid of every restored output."""
        return self._original

    @property
    def working_grid(self) -> Grid:
        """The grid the network sees before cropping (reoriented and resampled input grid)."""
        return self._resampled_grid or self._oriented_grid

    @property
    def crop(self) -> Optional[Slices]:
        """The (z, y, x) slices of ``working_grid`` that ``array`` holds, or None (no crop)."""
        return self._crop

    @property
    def is_identity(self) -> bool:
        """True when ``array`` lies on the input grid itself (no reorientation, resampling, crop)."""
        return self._original_orientation is None and self._resampled_grid is None and self._crop is None

    def restore_probabilities(self, probs_zyxk: np.ndarray) -> np.ndarray:
        """Map per-class probabilities (z, y, x, k) on ``array``'s grid onto the input grid.

        Outside the crop, class 0 (background) gets probability 1 and the others 0. Resampling is
        linear per class. Returns (Z, Y, X, k) float32 on the original grid (the input itself on
        the identity path, without a copy).
        """
        probs = np.asarray(probs_zyxk)
        self._check_shape(probs, 4, "probabilities")
        if self.is_identity:
            return probs
        classes = probs.shape[3]
        full = self._paste(probs.astype(np.float32, copy=False), background=_background(classes))
        if self._resampled_grid is None and self._original_orientation is None:
            return full  # cropped only: the working grid is the input grid
        image = self.working_grid.apply(sitk.GetImageFromArray(full, isVector=True))
        del full
        if self._resampled_grid is not None:
            image = resample_to_grid(image, self._oriented_grid, sitk.sitkLinear)
        image = self._undo_orientation(image)
        return sitk.GetArrayFromImage(image).reshape(self._original_shape_zyx + (classes,))

    def restore_labels(self, labels_zyx: np.ndarray) -> sitk.Image:
        """Map a label array (z, y, x) on ``array``'s grid onto the input grid (nearest neighbour).

        Outside the crop the label is 0. The result has exactly the input's size, spacing, origin
        and direction (copied from the input once the restored grid is checked against it).
        """
        labels = np.asarray(labels_zyx)
        self._check_shape(labels, 3, "labels")
        if labels.dtype == bool:
            labels = labels.astype(np.uint8)
        if not np.issubdtype(labels.dtype, np.integer):
            raise BadInputError(f"labels must be integers, got {labels.dtype}; take the argmax first")
        image = sitk.GetImageFromArray(self._paste(labels, background=np.zeros(1, labels.dtype)))
        if not self.is_identity:
            self.working_grid.apply(image)
            if self._resampled_grid is not None:
                image = resample_to_grid(image, self._oriented_grid, sitk.sitkNearestNeighbor)
            image = self._undo_orientation(image)
        image.CopyInformation(self._original)
        return image

    @property
    def _original_shape_zyx(self) -> Tuple[int, int, int]:
        return tuple(reversed(self._original.GetSize()))

    def _check_shape(self, values: np.ndarray, ndim: int, what: str) -> None:
        if values.ndim != ndim or values.shape[:3] != self.array.shape[:3]:
            raise BadInputError(
                f"{what} have shape {values.shape} but the prepared input is {self.array.shape[:3]} "
                f"(z, y, x){' + (classes,)' if ndim == 4 else ''}; pass the output for this input"
            )

    def _paste(self, values: np.ndarray, background: np.ndarray) -> np.ndarray:
        """``values`` placed at the crop in a working-grid array filled with ``background``."""
        if self._crop is None:
            return values
        full = np.empty(self.working_grid.shape_zyx + values.shape[3:], dtype=values.dtype)
        full[...] = background if values.ndim == 4 else background[0]
        full[self._crop] = values
        return full

    def _undo_orientation(self, image: sitk.Image) -> sitk.Image:
        """Reorient back to the input's axes and check the grid against the input's grid."""
        if self._original_orientation is not None:
            image = sitk.DICOMOrient(image, self._original_orientation)
        problem = Grid.of(self._original).difference(Grid.of(image))
        if problem is not None:
            raise UNet3DSegmentError(f"internal error: the restored grid differs from the input grid: {problem}")
        return image


def _background(classes: int) -> np.ndarray:
    """Probabilities outside the crop: certainly background (class 0)."""
    values = np.zeros(classes, dtype=np.float32)
    values[0] = 1.0
    return values


# ------------------------------------------------------------------------------------------ forward
def prepare(images: Sequence[sitk.Image], card: Any) -> PreparedInput:
    """Reorient, resample, crop and normalise the channels as ``card.input`` asks; stack them.

    ``images`` are the channels in the card's order, all on one grid (see
    ``image_io.read_channels``). Only ``card.input.{channels, orientation, spacing,
    normalization.method, normalization.params, crop_to_nonzero, background}`` are used.
    """
    spec = card.input
    channels = list(images)
    expected = tuple(spec.channels)
    if len(channels) != len(expected):
        raise BadInputError(
            f"the model expects {len(expected)} channel(s) ({', '.join(expected)}) but "
            f"{len(channels)} volume(s) were given; pass one volume per channel in that order"
        )
    original = channels[0]
    channels, warnings = _finite_channels(channels, expected)

    original_orientation = None
    if spec.orientation != "native":
        target = check_orientation_code(spec.orientation)
        current = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(original.GetDirection())
        if current != target:
            channels = [sitk.DICOMOrient(channel, target) for channel in channels]
            original_orientation = current
    oriented_grid = Grid.of(channels[0])

    resampled_grid = None
    if spec.spacing != "native":
        target_spacing = check_spacing(spec.spacing)
        if not np.allclose(oriented_grid.spacing, target_spacing, rtol=1e-6, atol=0.0):
            resampled_grid = target_grid(oriented_grid, target_spacing)
            channels = _resample_channels(channels, resampled_grid, oriented_grid)

    arrays = [sitk.GetArrayViewFromImage(channel) for channel in channels]  # no copies
    if getattr(spec, "background", None) is not None:
        spacing = (resampled_grid or oriented_grid).spacing
        arrays = clear_background(arrays, spec.background.below, spec.background.min_piece_ml, spacing)
    crop = nonzero_box(arrays, margin=1) if spec.crop_to_nonzero else None
    if crop is not None:
        arrays = [array[crop] for array in arrays]

    normalization = spec.normalization
    method, params = normalization.method, dict(normalization.params or {})
    stacked = np.empty(arrays[0].shape + (len(arrays),), dtype=np.float32)
    for index, array in enumerate(arrays):
        normalize_into(array, method, params, stacked[..., index])
    del arrays  # the views must not outlive ``channels``
    return PreparedInput(stacked, original, original_orientation, oriented_grid, resampled_grid, crop,
                         tuple(warnings))


def _finite_channels(channels: Sequence[sitk.Image], names: Sequence[str]) -> Tuple[list, list]:
    """The channels with every NaN/Inf voxel set to 0, and one warning per repaired channel.

    One non-finite voxel would otherwise spread through the normalisation statistics (and linear
    resampling) into every voxel, and the result would be all background without a word. Zero is
    what the normalisations treat as "no signal" (``zscore-nonzero`` leaves it out of the statistics,
    ``crop_to_nonzero`` crops it away). A channel with no finite voxel at all is refused.
    Integer images cannot hold non-finite values and are passed through without a look.
    """
    repaired, warnings = [], []
    for channel, name in zip(channels, names):
        if channel.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
            repaired.append(channel)
            continue
        view = sitk.GetArrayViewFromImage(channel)
        bad = _count_non_finite(view)
        if not bad:
            repaired.append(channel)
            continue
        if bad == view.size:
            raise BadInputError(
                f"input channel {name} holds no finite voxel (all NaN or Inf); check that the right "
                f"volume was given and that it was exported correctly"
            )
        values = sitk.GetArrayFromImage(channel)  # a copy: the caller's image stays as it was
        for first in range(0, values.shape[0], _slab_rows(values)):
            slab = values[first:first + _slab_rows(values)]
            slab[~np.isfinite(slab)] = 0
        fixed = sitk.GetImageFromArray(values)
        fixed.CopyInformation(channel)
        repaired.append(fixed)
        warnings.append(
            f"input channel {name} has {bad} non-finite voxel(s) (NaN or Inf) out of {view.size}; they were "
            f"set to 0 (fix the volume if they are not meant to be empty)"
        )
    return repaired, warnings


def _slab_rows(values: np.ndarray) -> int:
    """z-slices per chunk so that a chunk holds about ``_CHUNK`` voxels."""
    return max(1, _CHUNK // max(1, int(np.prod(values.shape[1:]))))


def _count_non_finite(values: np.ndarray) -> int:
    """How many voxels are NaN or +-Inf, chunk by chunk (no full-size mask)."""
    step = _slab_rows(values)
    return sum(int(values[first:first + step].size - np.count_nonzero(np.isfinite(values[first:first + step])))
               for first in range(0, values.shape[0], step))


def _resample_channels(channels: Sequence[sitk.Image], grid: Grid, source: Grid) -> list:
    """Resample every channel onto ``grid`` (float32), refusing a grid this machine cannot hold.

    The resampled channels and the stacked network input are float32 copies of the new grid, so
    ``2 x channels x voxels x 4`` bytes are needed at least; above the machine's memory that is an
    ``OutOfMemoryError`` naming the grid, before anything is allocated.
    """
    from ..base.units import format_size
    from ..runtime.cpu import total_memory

    voxels = int(np.prod(grid.size, dtype=np.float64))
    needed = 2 * len(channels) * voxels * 4
    where = (f"resampling to the model's spacing {_fmt_mm(grid.spacing)} mm makes a grid of "
             f"{'x'.join(map(str, grid.size))} voxels ({format_size(needed)} for the input alone)")
    fix = (f"the input's spacing is {_fmt_mm(source.spacing)} mm: check that the volume's spacing is right "
           f"and that the model card's spacing is in mm, or use a machine with more memory")
    memory = total_memory()
    if memory and needed > memory:
        raise OutOfMemoryError(f"{where}, more than this machine's {format_size(memory)}; {fix}")
    try:
        return [resample_to_grid(channel, grid, sitk.sitkLinear, sitk.sitkFloat32) for channel in channels]
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        raise OutOfMemoryError(f"{where}: out of memory; {fix}") from error


def _fmt_mm(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def check_orientation_code(code: Any) -> str:
    """The upper-case 3-letter code (one of R/L, A/P, S/I each), else BadModelError."""
    text = str(code).upper()
    axes = sorted("RLAPSI".index(letter) // 2 for letter in text if letter in "RLAPSI")
    if len(text) != 3 or axes != [0, 1, 2]:
        raise BadModelError(
            f"model card orientation {code!r} is not 'native' or a 3-letter code such as 'RAS' or "
            f"'LPS' (one of R/L, A/P, S/I each); fix the model card"
        )
    return text


def check_spacing(spacing: Any) -> Tuple[float, float, float]:
    """Three positive finite numbers (x, y, z) in mm, else BadModelError."""
    try:
        values = tuple(float(value) for value in spacing)
    except (TypeError, ValueError) as error:
        raise BadModelError(f"model card spacing {spacing!r} must be 'native' or [x, y, z] in mm") from error
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise BadModelError(f"model card spacing {spacing!r} must be 'native' or three positive numbers [x, y, z] in mm")
    return values


def target_grid(grid: Grid, spacing: Sequence[float]) -> Grid:
    """The grid covering ``grid``'s extent at ``spacing``: same origin and direction,
    size = round(size * old spacing / new spacing), at least 1."""
    size = tuple(
        max(1, int(np.floor(n * old / new + 0.5))) for n, old, new in zip(grid.size, grid.spacing, spacing)
    )
    return Grid(size, tuple(float(s) for s in spacing), grid.origin, grid.direction)


def resample_to_grid(image: sitk.Image, grid: Grid, interpolator: int,
              pixel_type: Optional[int] = None) -> sitk.Image:
    """Resample onto ``grid`` (as ``pixel_type``, default the input's); points beyond the
    input's edge take the nearest edge voxel's value."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(grid.size)
    resampler.SetOutputSpacing(grid.spacing)
    resampler.SetOutputOrigin(grid.origin)
    resampler.SetOutputDirection(grid.direction)
    resampler.SetInterpolator(interpolator)
    resampler.SetUseNearestNeighborExtrapolator(True)
    if pixel_type is not None:
        resampler.SetOutputPixelType(pixel_type)
    return resampler.Execute(image)


def background_level(array: np.ndarray, below: float) -> float:
    """The intensity under which ``array``'s voxels count as background: ``below`` x its 99th percentile
    (of a strided sample of at most ~2 M voxels: the same level to a fraction of a per cent, 10x faster)."""
    flat = array.reshape(-1)
    step = max(1, flat.size // 2_000_000)
    return below * float(np.percentile(flat[::step], 99.0))


def clear_background(arrays: Sequence[np.ndarray], below: float, min_piece_ml: float,
                     spacing: Sequence[float]) -> list:
    """The channels with their background set to 0 (card ``input.background``; see ``card.BackgroundSpec``).

    Foreground: voxels at or above :func:`background_level` in any channel, less its connected pieces
    (face-connected) smaller than ``min_piece_ml``, with its enclosed cavities filled (dark ventricles
    stay). Only the foreground's bounding box is labelled, so large volumes of air cost little.
    Channels with nothing to clear are returned as they are; the others as new arrays.
    """
    foreground = np.zeros(arrays[0].shape, dtype=bool)
    for array in arrays:
        foreground |= array >= background_level(array, below)
    box = nonzero_box([foreground], margin=1)
    if box is None and foreground.any():  # the foreground (noise, say) reaches every face
        box = (slice(None), slice(None), slice(None))
    if box is not None:
        inside = foreground[box]
        voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
        smallest = int(np.ceil(min_piece_ml / voxel_ml)) if voxel_ml > 0 else 0
        mask = sitk.GetImageFromArray(inside.view(np.uint8))
        if smallest > 1:
            pieces = sitk.RelabelComponent(sitk.ConnectedComponent(mask, False), minimumObjectSize=smallest,
                                           sortByObjectSize=False)
            mask = sitk.Cast(pieces > 0, sitk.sitkUInt8)
        mask = sitk.BinaryFillhole(mask, False, 1)
        foreground[box] = sitk.GetArrayViewFromImage(mask) > 0
    cleared = []
    for array in arrays:
        if np.count_nonzero(array[~foreground]) == 0:
            cleared.append(array)  # its background is zero already
        else:
            cleared.append(np.where(foreground, array, np.zeros((), dtype=array.dtype)))
    return cleared


def nonzero_box(arrays: Sequence[np.ndarray], margin: int = 1) -> Optional[Slices]:
    """(z, y, x) slices of the box holding every non-zero voxel of all ``arrays``, grown by
    ``margin`` voxels and clipped to the array; None when that box is the whole array or when
    all voxels are zero (nothing to crop)."""
    mask = np.zeros(arrays[0].shape, dtype=bool)
    for array in arrays:
        mask |= array != 0
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        other_axes = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other_axes))
        box.append(slice(max(0, int(hits[0]) - margin), min(mask.shape[axis], int(hits[-1]) + 1 + margin)))
    if all(s.start == 0 and s.stop == n for s, n in zip(box, mask.shape)):
        return None
    return tuple(box)


# ------------------------------------------------------------------------------------ normalisation
def normalize(array: np.ndarray, method: str, params: Optional[Mapping[str, Any]] = None) -> np.ndarray:
    """One channel normalised as a model card's ``normalization`` says, as a new float32 array.

    - ``zscore-nonzero``: (x - mean) / std over the non-zero voxels; zero voxels stay 0.
    - ``percentile-zscore``: clip to the ``lower``/``upper`` percentiles (default 0.5/99.5) of all
      voxels, then (x - mean) / std of the clipped values.
    - ``window``: clip to [``min``, ``max``] and scale to [0, 1].
    - ``none``: cast to float32.
    A constant channel is divided by 1 instead of its zero standard deviation.
    """
    out = np.empty(np.shape(array), dtype=np.float32)
    normalize_into(np.asarray(array), method, dict(params or {}), out)
    return out


def normalize_into(array: np.ndarray, method: str, params: Mapping[str, Any], out: np.ndarray) -> None:
    """``normalize`` writing into ``out`` (float32, same shape; may be a strided view)."""
    if method == "zscore-nonzero":
        mask = array != 0
        out[...] = 0.0
        if not mask.any():
            return
        mean, std = _mean_std(array[mask])
        np.subtract(array, mean, out=out, where=mask, casting="unsafe")
        np.divide(out, std, out=out, where=mask)
    elif method == "percentile-zscore":
        lower, upper = float(params.get("lower", 0.5)), float(params.get("upper", 99.5))
        if not 0.0 <= lower < upper <= 100.0:
            raise BadModelError(
                f"percentile-zscore needs 0 <= lower < upper <= 100, got lower={lower}, upper={upper}; "
                f"fix the model card"
            )
        low, high = np.percentile(array, [lower, upper])
        np.clip(array, low, high, out=out, casting="unsafe")
        mean, std = _mean_std(out)
        out -= np.float32(mean)
        out /= np.float32(std)
    elif method == "window":
        if "min" not in params or "max" not in params:
            raise BadModelError("window normalisation needs 'min' and 'max'; add them to the model card")
        low, high = float(params["min"]), float(params["max"])
        if not high > low:
            raise BadModelError(f"window normalisation needs max > min, got min={low}, max={high}; fix the model card")
        np.clip(array, low, high, out=out, casting="unsafe")
        out -= np.float32(low)
        out /= np.float32(high - low)
    elif method == "none":
        out[...] = array
    else:
        raise BadModelError(
            f"unknown normalisation method {method!r}; use one of {', '.join(NORMALIZATIONS)}"
        )


def _mean_std(values: np.ndarray) -> Tuple[float, float]:
    """Mean and standard deviation accumulated in float64, chunk by chunk (bounded memory);
    a standard deviation below ``_TINY_STD`` is returned as 1."""
    flat = values.reshape(-1)
    count = flat.size
    total = sum(float(np.sum(flat[i:i + _CHUNK], dtype=np.float64)) for i in range(0, count, _CHUNK))
    mean = total / count
    squares = sum(
        float(np.sum(np.square(flat[i:i + _CHUNK].astype(np.float64) - mean)))
        for i in range(0, count, _CHUNK)
    )
    std = (squares / count) ** 0.5
    return mean, (std if std >= _TINY_STD else 1.0)
