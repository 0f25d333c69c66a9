"""Precision: what auto picks, the mixed-precision rebuild (float32 output), and its effect on results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from UNet3DSegmentLib.base.errors import BadInputError
from UNet3DSegmentLib.engine.loading import load_model
from UNet3DSegmentLib.engine.postprocessing import dice_per_class
from UNet3DSegmentLib.runtime.cpu import cpu_flags, cpu_has_bf16
from UNet3DSegmentLib.runtime.precision import (
    MIN_BF16_PATCH_SIDE,
    apply_precision,
    choose_precision,
    model_policy,
    resolve_precision,
)

ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
SAPPHIRE_RAPIDS = frozenset({"avx512f", "amx_bf16", "amx_tile"})
OLD_CPU = frozenset({"avx2", "fma"})


@pytest.mark.parametrize(
    "precision, device, flags, expected",
    [
        ("auto", "cpu", ZEN4, "bf16"),
        ("auto", "cpu", SAPPHIRE_RAPIDS, "bf16"),
        ("auto", "cpu", OLD_CPU, "fp32"),
        ("auto", "gpu:0", OLD_CPU, "bf16"),
        ("fp32", "gpu:1", ZEN4, "fp32"),
        ("bf16", "cpu", OLD_CPU, "bf16"),  # asked for: given (with a warning), not silently changed
        ("FP16", "gpu:0", ZEN4, "fp16"),
    ],
)
def test_resolve_precision(precision, device, flags, expected):
    assert resolve_precision(precision, device, flags) == expected


def test_fp16_is_for_gpus_only():
    with pytest.raises(BadInputError, match=r"^fp16 runs on GPUs only \(CPUs lack float16 kernels for 3D pooling\); "
                                            r"use bf16 or fp32$"):
        resolve_precision("fp16", "cpu", ZEN4)


def test_fp16_policy_keeps_the_output_float32(fp32_model):
    mixed = apply_precision(fp32_model.keras_model, "fp16")
    policies = {layer.name: layer.dtype_policy.name for layer in mixed.layers}
    assert policies["conv_0_1"] == "mixed_float16" and policies["conv_out"] == "float32"


def test_resolve_precision_rejects_unknown():
    with pytest.raises(BadInputError, match=r"^precision must be one of auto, fp32, bf16, fp16, got 'int8'$"):
        resolve_precision("int8", "cpu", ZEN4)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n")
    assert cpu_flags(cpuinfo) == frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert cpu_has_bf16(frozenset({"amx_bf16"})) and not cpu_has_bf16(OLD_CPU)


def test_training_precision_follows_the_mixed_precision_option():
    assert choose_precision("off") == "float32"
    assert choose_precision("on", (16, 16, 16)) == "mixed_bfloat16"
    assert choose_precision("auto", (MIN_BF16_PATCH_SIDE - 8,) * 3) == "float32"  # tiny patches: NaN risk
    with pytest.raises(BadInputError, match=r"^mixed precision must be one of auto, on, off, got 'maybe'$"):
        choose_precision("maybe")


@pytest.fixture(scope="module")
def fp32_model(tiny_model_path: Path):
    return load_model(tiny_model_path, precision="fp32")


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    return np.random.default_rng(7).normal(size=(3, 16, 16, 16, 1)).astype(np.float32)


def test_bf16_model_keeps_float32_output_and_matches_fp32(tiny_model_path: Path, fp32_model, patches):
    precision, policy = "bf16", "mixed_bfloat16"
    loaded = load_model(tiny_model_path, precision=precision)
    assert loaded.precision == precision
    policies = {layer.name: layer.dtype_policy.name for layer in loaded.keras_model.layers}
    assert policies["conv_0_1"] == policy and policies["batch_normalization"] == policy
    assert policies["conv_out"] == "float32"  # the softmax layer
    assert model_policy(fp32_model.keras_model) == "float32"
    mixed, exact = loaded.predict(patches), fp32_model.predict(patches)
    assert mixed.dtype == np.float32
    np.testing.assert_allclose(mixed.sum(-1), 1.0, atol=1e-5)  # float32 softmax
    error = np.abs(mixed - exact).max()
    assert 0 < error < 0.05  # really lower precision, still close
    assert (mixed.argmax(-1) == exact.argmax(-1)).mean() > 0.97
    assert loaded._function.function.experimental_get_tracing_count() == 1


def test_fp32_leaves_a_float32_model_unchanged(fp32_model):
    assert apply_precision(fp32_model.keras_model, "fp32") is fp32_model.keras_model


def test_bf16_model_back_to_fp32_is_exact(tiny_model_path: Path, fp32_model, patches):
    mixed = load_model(tiny_model_path, precision="bf16").keras_model
    restored = apply_precision(mixed, "fp32")
    np.testing.assert_array_equal(restored(patches, training=False).numpy(), fp32_model.predict(patches))


def test_auto_on_this_machine_follows_the_cpu(tiny_model_path: Path):
    loaded = load_model(tiny_model_path, precision="auto")
    assert loaded.precision == ("bf16" if cpu_has_bf16() else "fp32")


def test_bf16_labelmap_dice_against_fp32(tiny_model_path: Path):
    """A whole sliding-window run: the bf16 labelmap agrees with fp32 (random tiny weights)."""
    from UNet3DSegmentLib.engine.pipeline import SegmentOptions, segment_images

    rng = np.random.default_rng(11)
    image = sitk.GetImageFromArray(rng.normal(50, 10, size=(24, 28, 30)).astype(np.float32))
    labels = {}
    for precision in ("fp32", "bf16"):
        loaded = load_model(tiny_model_path, precision=precision)
        result = segment_images([image], loaded, SegmentOptions(overlap=0.5, precision=precision))
        labels[precision] = sitk.GetArrayFromImage(result.labels)
    agreement = (labels["fp32"] == labels["bf16"]).mean()
    assert 0.97 < agreement < 1.0
    dice = dice_per_class(labels["bf16"], labels["fp32"], range(1, 4))
    assert min(dice.values()) > 0.95, dice
