"""Bounded memory: z-slab accumulation equals the full-volume result, the budget, the estimate, and the
512x512x400 CT bound measured as peak RSS of a real run."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TINY_CARD, save_tiny_model
from UNet3DSegmentLib.cli.main import main
from UNet3DSegmentLib.base.errors import BadInputError
from UNet3DSegmentLib.engine.accumulator import SlabAccumulator, ring_depth
from UNet3DSegmentLib.engine.tiling import count_patches, grid_starts
from UNet3DSegmentLib.engine.window import WindowConfig, iter_probability_slabs, sliding_window_predict
from UNet3DSegmentLib.base.units import format_size, parse_size
from UNet3DSegmentLib.engine.memory import estimate_memory, probability_bytes

GIB = 1024 ** 3


def smooth_predictor(batch: np.ndarray) -> np.ndarray:
    """Position-dependent 3-class output, so that blending errors would show."""
    x = batch[..., :1]
    return np.concatenate([np.sin(x), np.cos(x) ** 2, x * 0.01], axis=-1).astype(np.float32)


def volume(shape=(45, 20, 26), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape + (1,)).astype(np.float32)


def reference_blend(image, predict, patch, overlap, batch_size):
    """The plain full-volume weighted average (what the slab ring must reproduce)."""
    from UNet3DSegmentLib.engine.blending import importance_map

    weights = importance_map(patch, "gaussian")
    starts = grid_starts(image.shape[:3], patch, overlap)
    sums = np.zeros(image.shape[:3] + (3,), np.float32)
    total = np.zeros(image.shape[:3], np.float32)
    pz, py, px = patch
    for first in range(0, len(starts), batch_size):
        group = starts[first:first + batch_size]
        batch = np.stack([image[z:z + pz, y:y + py, x:x + px] for z, y, x in group])
        prediction = predict(batch) * weights[None, ..., None]
        for i, (z, y, x) in enumerate(group):
            sums[z:z + pz, y:y + py, x:x + px] += prediction[i]
            total[z:z + pz, y:y + py, x:x + px] += weights
    return sums / total[..., None]


@pytest.mark.parametrize("overlap, batch_size", [(0.5, 1), (0.5, 3), (0.25, 2), (0.0, 4)])
def test_slabs_equal_the_full_volume_blend(overlap, batch_size):
    image = volume()
    expected = reference_blend(image, smooth_predictor, (16, 16, 16), overlap, batch_size)
    window = WindowConfig((16, 16, 16), overlap, "gaussian", batch_size)
    slabs = list(iter_probability_slabs(image, smooth_predictor, window))
    firsts = [first for first, _ in slabs]
    assert firsts == sorted(firsts) and firsts[0] == 0
    assert sum(slab.shape[0] for _, slab in slabs) == 45 and len(slabs) > 1  # really slab by slab
    stacked = np.concatenate([slab for _, slab in slabs])
    np.testing.assert_allclose(stacked, expected, rtol=1e-6, atol=1e-6)
    full = sliding_window_predict(image, smooth_predictor, window)
    np.testing.assert_array_equal(full, stacked)


def test_slabs_with_padding_and_prefetch_off_are_identical():
    image = volume((10, 20, 26))  # z shorter than the patch: padded and cropped back
    with_prefetch = sliding_window_predict(image, smooth_predictor, patch_size=(16, 16, 16), prefetch=True)
    without = sliding_window_predict(image, smooth_predictor, patch_size=(16, 16, 16), prefetch=False)
    np.testing.assert_array_equal(with_prefetch, without)
    assert with_prefetch.shape == (10, 20, 26, 3)


def test_ring_depth_is_one_patch_plus_the_batch_spread():
    starts = grid_starts((100, 16, 16), (16, 16, 16), 0.5)  # z starts 0, 7, 14, ... one tile per row
    assert ring_depth(starts, 1, 16, 100) == 16
    assert ring_depth(starts, 2, 16, 100) == 16 + 7 + 1 or ring_depth(starts, 2, 16, 100) == 16 + 8
    assert ring_depth(grid_starts((40, 64, 64), (16, 16, 16), 0.5), 2, 16, 40) == 16 + 8  # rows change mid-batch
    assert ring_depth(starts, 50, 16, 100) == 100  # never more than the volume


def test_accumulator_wraps_around_the_ring():
    ring = SlabAccumulator(depth=5, shape_yx=(1, 1), classes=1, dtype=np.dtype(np.float32))
    weights = np.ones((3, 1, 1), np.float32)
    ring.add(np.full((1, 3, 1, 1, 1), 2.0, np.float32), [(0, 0, 0)], weights)
    ring.add(np.full((1, 3, 1, 1, 1), 4.0, np.float32), [(2, 0, 0)], weights)  # rows 2..4
    np.testing.assert_array_equal(ring.take(0, 2)[:, 0, 0, 0], [2.0, 2.0])
    ring.add(np.full((1, 3, 1, 1, 1), 6.0, np.float32), [(4, 0, 0)], weights)  # rows 4..6 -> ring 4, 0, 1
    np.testing.assert_array_equal(ring.take(2, 7)[:, 0, 0, 0], [3.0, 4.0, 5.0, 6.0, 6.0])
    assert not ring.sums.any() and not ring.weights.any()  # taken rows are cleared


def test_float16_accumulation_is_close_and_halves_the_ring():
    image = volume()
    exact = sliding_window_predict(image, smooth_predictor, patch_size=(16, 16, 16), overlap=0.5)
    half = sliding_window_predict(image, smooth_predictor, patch_size=(16, 16, 16), overlap=0.5,
                                  accumulation="float16")
    assert half.dtype == np.float32
    error = np.abs(half - exact).max()
    assert 0 < error < 5e-3  # float16 keeps ~3 significant digits of sums up to ~8
    with pytest.raises(BadInputError, match=r"^accumulation must be one of float32, float16, got 'int8'$"):
        sliding_window_predict(image, smooth_predictor, patch_size=(16, 16, 16), accumulation="int8")


def test_prefetch_thread_stops_when_the_run_fails():
    def failing(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        sliding_window_predict(volume(), failing, patch_size=(16, 16, 16), overlap=0.5)
    assert not [t for t in threading.enumerate() if t.name in ("unet3d-prefetch", "unet3d-model")]


def test_model_thread_gives_the_same_values_and_progress_as_running_in_turn():
    """With test-time flips and a batch that ends short: same sums, same progress steps, calls in order."""
    image = volume((30, 20, 26))
    runs = {}
    for prefetch in (True, False):
        steps: list[tuple[int, int]] = []
        seen: list[float] = []

        def recording(batch: np.ndarray) -> np.ndarray:
            seen.append(float(batch[:, 0, 0, 0, 0].sum()))
            return smooth_predictor(batch)

        window = WindowConfig((16, 16, 16), 0.5, batch_size=3, mirror_axes=(0, 2), prefetch=prefetch)
        values = sliding_window_predict(image, recording, window, progress=lambda d, t: steps.append((d, t)))
        runs[prefetch] = (values, steps, seen)
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    assert runs[True][1] == runs[False][1] and runs[True][1][-1] == (72, 72)  # 18 tiles x 4 flips
    assert runs[True][2] == runs[False][2]  # the predictor saw the same batches in the same order


@pytest.mark.parametrize(
    "text, expected",
    [("4G", 4 * GIB), ("512M", 512 * 1024 ** 2), ("1.5GiB", int(1.5 * GIB)), ("2gb", 2 * GIB), ("1000", 1000)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(BadInputError, match=r"^memory size '4 apples' is not a size such as 4G, 512M or 1.5GiB$"):
        parse_size("4 apples")


def test_memory_estimate_of_a_big_ct():
    estimate = estimate_memory(
        input_shape_zyx=(400, 512, 512), input_bytes_per_voxel=2, work_shape_zyx=(400, 512, 512), channels=1,
        classes=4, accumulator_depth=64, batch_size=2, patch_size=(64, 64, 64), largest_activation=64 ** 3 * 2,
        parameters=20_000,
    )
    voxels = 400 * 512 * 512
    assert estimate.network_input == voxels * 4
    assert estimate.accumulator == 64 * 512 * 512 * (4 * 4 + 4)
    assert estimate.full_probabilities == 0
    assert estimate.total < 4 * GIB
    assert probability_bytes((400, 512, 512), 4) == voxels * 16  # what the slabs avoid: 1.56 GiB
    assert format_size(probability_bytes((400, 512, 512), 4)) == "1.56 GiB"


# --------------------------------------------------------------------------------------------------
# The pipeline and the command line


def resampling_model(folder: Path) -> Path:
    card = copy.deepcopy(TINY_CARD)
    card["input"]["spacing"] = [1.0, 1.0, 1.0]
    return save_tiny_model(folder, card=card, name="resampling")


def test_budget_too_small_for_probabilities(tmp_path: Path):
    from UNet3DSegmentLib.engine.loading import load_model
    from UNet3DSegmentLib.engine.pipeline import SegmentOptions, segment_images

    loaded = load_model(resampling_model(tmp_path))
    z, y, x = np.mgrid[0:14, 0:20, 0:22]
    image = sitk.GetImageFromArray((50 + 3 * x + 2 * y - z).astype(np.float32))  # smooth: coherent labels
    image.SetSpacing((1.3, 1.3, 1.6))
    roomy = segment_images([image], loaded, SegmentOptions(precision="fp32"))
    events: list[dict] = []
    tight = segment_images([image], loaded, SegmentOptions(precision="fp32", max_memory=1000), events.append)
    warnings = [e["message"] for e in events if e["stage"] == "warning"]
    assert len(warnings) == 1 and warnings[0].startswith("probabilities would need ")
    assert warnings[0].endswith("above the memory budget of 0 MiB: resampling the labelmap itself (nearest neighbour) instead")
    a, b = sitk.GetArrayFromImage(roomy.labels), sitk.GetArrayFromImage(tight.labels)
    assert a.shape == b.shape == (14, 20, 22)
    assert (a == b).mean() > 0.8  # labels resampled instead of probabilities: nearly the same
    with pytest.raises(BadInputError, match=r"^writing probabilities needs .* raise --max-memory or leave out --probabilities$"):
        segment_images([image], loaded, SegmentOptions(max_memory=1000), keep_probabilities=True)


def test_estimate_command(tmp_path: Path, tiny_model_path: Path, capsys):
    path = tmp_path / "in.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((30, 40, 50), np.int16)), str(path))
    assert main(["estimate", str(path), "--model", str(tiny_model_path), "--json", "--precision", "fp32"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert estimate["patches"] == count_patches((30, 40, 50), (16, 16, 16), 0.5) == 3 * 4 * 6
    assert estimate["network_shape_zyx"] == [30, 40, 50]
    memory = estimate["memory_bytes"]
    assert memory["input_volumes"] == 30 * 40 * 50 * 2 and memory["network_input"] == 30 * 40 * 50 * 4
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert [row["device"] for row in estimate["times"]][0] == "cpu"
    assert estimate["times"][0]["seconds"] == pytest.approx(estimate["times"][0]["seconds_per_patch"] * 72)
    assert main(["estimate", str(path), "--model", str(tiny_model_path), "--measure", "--precision", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "72 patches" in text and "(measured)" in text and "memory (approximate peak)" in text


@pytest.mark.skipif(os.environ.get("UNET3D_SLOW_TESTS") != "1",
                    reason="slow (about 45 s on 2 cores): run with UNET3D_SLOW_TESTS=1, or "
                    "python benchmarks/bench_inference.py --memory-check")
def test_big_ct_stays_under_4_gb(tmp_path: Path):
    """512x512x400 int16 CT, 4 classes, tiny 64^3 model, overlap 0: peak RSS of the whole run < 4 GB."""
    card = copy.deepcopy(TINY_CARD)
    card["input"]["patch_size"] = [64, 64, 64]
    card["network"]["base_filters"] = 1
    model = save_tiny_model(tmp_path / "model", card=card, name="ct")
    ct = tmp_path / "ct.nrrd"
    array = np.random.default_rng(0).integers(-1000, 1500, size=(400, 512, 512), dtype=np.int16)
    image = sitk.GetImageFromArray(array)
    del array
    image.SetSpacing((0.7, 0.7, 1.0))
    sitk.WriteImage(image, str(ct), False)
    del image
    output = tmp_path / "labels.nrrd"
    code = (
        "import resource, sys\n"
        "from UNet3DSegmentLib.cli.main import main\n"
        f"code = main(['segment', {str(ct)!r}, '-o', {str(output)!r}, '--model', {str(model)!r},"
        " '--overlap', '0', '--batch-size', '4', '--progress', 'none'])\n"
        "print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    exit_code, max_rss_kib = map(int, result.stdout.split()[-2:])
    assert exit_code == 0
    assert max_rss_kib * 1024 < 4 * 10 ** 9, f"peak RSS {max_rss_kib / 1024 ** 2:.2f} GiB"
    labels = sitk.ReadImage(str(output))
    assert labels.GetSize() == (512, 512, 400) and labels.GetPixelID() == sitk.sitkUInt8


def test_seed_network_flops_and_expected_time():
    """488.5 GFLOP per 64^3 patch (DESIGN.md's count); 2 Zen 4 cores: ~2.2 s fp32, ~1.16 s bf16."""
    from UNet3DSegmentLib.engine.memory import expected_seconds_per_patch, largest_activation, model_flops
    from UNet3DSegmentLib.engine.network import build_unet3d

    model = build_unet3d()
    flops = model_flops(model)
    assert flops == 488_535_752_704
    assert largest_activation(model) == 64 ** 3 * 192  # concat_0: 64 skip + 128 upsampled channels
    assert expected_seconds_per_patch(flops, "cpu", "fp32", 2) == pytest.approx(2.2, abs=0.05)
    assert expected_seconds_per_patch(flops, "cpu", "bf16", 2) == pytest.approx(1.16, abs=0.05)
    assert expected_seconds_per_patch(flops, "gpu:0", "bf16", 2) == pytest.approx(flops / 30e12)
    assert expected_seconds_per_patch(flops, "gpu:0", "bf16", 2, backend="jax") == pytest.approx(flops / 96e12)


@pytest.mark.parametrize("bands", [2, 3, 7])
def test_blending_in_y_bands_on_several_threads_is_bit_identical(bands: int, monkeypatch):
    """Machines with many cores blend in y bands on a thread pool: the sums must not change by one bit."""
    import UNet3DSegmentLib.engine.window as window_module

    image = volume((30, 37, 26))
    window = WindowConfig((16, 16, 16), 0.5, batch_size=3)
    single = sliding_window_predict(image, smooth_predictor, window)
    monkeypatch.setattr(window_module, "blend_threads", lambda cores=None: bands)
    threads_seen: set[str] = set()

    def spying(batch: np.ndarray) -> np.ndarray:
        threads_seen.update(t.name for t in threading.enumerate())
        return smooth_predictor(batch)

    banded = sliding_window_predict(image, spying, window)
    np.testing.assert_array_equal(banded, single)
    assert any(name.startswith("unet3d-blend") for name in threads_seen)
    assert not [t for t in threading.enumerate() if t.name.startswith("unet3d-blend")]  # pool shut down


def test_blend_threads_grow_with_the_cores():
    from UNet3DSegmentLib.engine.accumulator import _band_edges, blend_threads

    assert [blend_threads(c) for c in (1, 2, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 4]
    assert _band_edges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert _band_edges(2, 4) == [(0, 1), (1, 2)]
