"""Memory budget and run estimates: ``--max-memory``, and what ``unet3d-segment estimate`` prints.

The segmentation keeps one float32 copy of the (cropped) network input, a ring of about one patch of
z rows of class sums (``accumulator.SlabAccumulator``) and a uint8 labelmap; the full-volume
probability array exists only when the output must be resampled from probabilities or is written
(``--probabilities``), and then only if it fits the budget. The figures here follow that layout; the
framework's own share (runtime, weights, activations) is an approximation calibrated on this
project's machine (``BENCHMARKS.md``). Pure numpy: no framework import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..base.units import GIB, MIB, format_size
from ..runtime.cpu import total_memory


FRAMEWORK_BYTES = 700 * MIB  # TensorFlow runtime + Python + SimpleITK, measured idle after a load
ACTIVATION_FACTOR = 3.0  # peak live activations per patch, in units of the largest layer output

# Sustained throughput of the seed network's 3D convolutions, GFLOP/s. CPU figures are per core,
# measured on this project's AMD EPYC Zen 4 cores (AVX-512, AVX512-BF16, ~3.6 GHz): 223 fp32 and
# 423 bf16 GFLOP/s on 2 cores. GPU figures are whole sliding windows (240x240x155, overlap 0.5,
# batch 2) measured on an NVIDIA H200 per Keras backend (BENCHMARKS.md): JAX compiles the network
# with XLA; Keras on PyTorch runs it layer by layer. TensorFlow GPU was not measured (no TensorFlow
# on the GPU machine): PyTorch's figures stand in as the cautious guess. ``estimate --measure`` times
# the real device.
CPU_GFLOPS_PER_CORE = {"fp32": 111.0, "bf16": 211.0, "fp16": 20.0}
CPU_GFLOPS_PER_CORE_NO_AVX512 = {"fp32": 55.0, "bf16": 10.0, "fp16": 10.0}
GPU_GFLOPS_BY_BACKEND = {
    "jax": {"fp32": 79_000.0, "bf16": 96_000.0, "fp16": 96_000.0},
    "torch": {"fp32": 31_000.0, "bf16": 30_000.0, "fp16": 30_000.0},
}
GPU_GFLOPS_BY_BACKEND["tensorflow"] = GPU_GFLOPS_BY_BACKEND["torch"]  # not measured: the cautious figures
# Narrow layers are bound by memory traffic and per-op overhead, not arithmetic: CPU seconds per
# element of every layer output (per core), calibrated on a 1-filter 64^3 model on this machine.
CPU_SECONDS_PER_ACTIVATION = 6e-9  # 40 ms per 64^3 patch of a 1-filter seed net (bf16, 2 cores)


def default_budget() -> int:
    """Budget when ``--max-memory`` is not given: half the machine's memory (4 GiB where unknown)."""
    total = total_memory()
    return total // 2 if total else 4 * GIB


def probability_bytes(shape_zyx: Sequence[int], classes: int) -> int:
    """Bytes of a full float32 ``(z, y, x, classes)`` probability array."""
    return int(math.prod(shape_zyx)) * classes * 4


@dataclass(frozen=True)
class MemoryEstimate:
    """The main buffers of one run, in bytes, and their sum (an approximate peak)."""

    input_volumes: int  # the volumes as read
    network_input: int  # float32 (z, y, x, channels) after cropping
    accumulator: int  # ring of class sums and weights
    full_probabilities: int  # 0 unless probabilities are kept / resampled
    labels: int  # labelmap on the working and the input grid
    model: int  # weights, patch buffers and peak activations of one batch
    framework: int  # runtime baseline

    @property
    def total(self) -> int:
        return (self.input_volumes + self.network_input + self.accumulator + self.full_probabilities
                + self.labels + self.model + self.framework)

    def lines(self) -> list[str]:
        parts = [
            ("input volumes", self.input_volumes), ("network input (float32)", self.network_input),
            ("accumulator (z slabs)", self.accumulator), ("full probabilities", self.full_probabilities),
            ("labelmaps", self.labels), ("model, batch and activations", self.model),
            ("framework runtime", self.framework),
        ]
        return [f"  {name:<30} {format_size(value):>12}" for name, value in parts if value]


def estimate_memory(
    input_shape_zyx: Sequence[int],
    input_bytes_per_voxel: int,
    work_shape_zyx: Sequence[int],
    channels: int,
    classes: int,
    accumulator_depth: int,
    batch_size: int,
    patch_size: Sequence[int],
    largest_activation: int,
    parameters: int,
    accumulation_bytes: int = 4,
    full_probabilities: bool = False,
) -> MemoryEstimate:
    """Approximate peak memory of a run (see the module docstring for the layout).

    ``input_*``: the volumes as read (all channels); ``work_shape_zyx``: the network's grid after
    resampling and cropping; ``largest_activation``: elements of the model's largest layer output
    for one patch; ``accumulator_depth``: z rows of the ring (``accumulator.ring_depth``).
    """
    in_voxels = int(math.prod(input_shape_zyx))
    work_voxels = int(math.prod(work_shape_zyx))
    plane = int(work_shape_zyx[1]) * int(work_shape_zyx[2])
    patch_voxels = int(math.prod(patch_size))
    full = probability_bytes(work_shape_zyx, classes) + probability_bytes(input_shape_zyx, classes) if full_probabilities else 0
    model = (
        parameters * 4 * 2  # weights, and their cast copies under mixed precision
        + 4 * batch_size * patch_voxels * (3 * channels + classes)  # patch and prediction buffers
        + int(ACTIVATION_FACTOR * 4 * batch_size * largest_activation)
    )
    return MemoryEstimate(
        input_volumes=in_voxels * input_bytes_per_voxel,
        network_input=work_voxels * channels * 4,
        accumulator=min(accumulator_depth, int(work_shape_zyx[0])) * plane * (classes * accumulation_bytes + 4),
        full_probabilities=full,
        labels=work_voxels + 2 * in_voxels,
        model=model,
        framework=FRAMEWORK_BYTES,
    )


def model_flops(model: Any) -> int:
    """Multiply-adds x 2 of one forward pass of one patch, over the model's 3D (transposed) convolutions."""
    total = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in ("Conv3D", "Conv3DTranspose"):
            continue
        kernel = math.prod(layer.kernel_size)
        in_channels = int(layer.input.shape[-1])
        spatial = layer.input.shape[1:4] if kind == "Conv3DTranspose" else layer.output.shape[1:4]
        total += 2 * int(math.prod(spatial)) * kernel * in_channels * int(layer.filters)
    return total


def _activation_sizes(model: Any) -> list[int]:
    """Elements of each 5-D layer output of the model for one patch."""
    sizes = []
    for layer in model.layers:
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 5 and None not in shape[1:]:
            sizes.append(int(math.prod(shape[1:])))
    return sizes


def largest_activation(model: Any) -> int:
    """Elements of the largest layer output of the model for one patch."""
    return max(_activation_sizes(model), default=0)


def activation_elements(model: Any) -> int:
    """Elements of all layer outputs of the model for one patch (the memory traffic of a pass)."""
    return sum(_activation_sizes(model))


def expected_seconds_per_patch(
    flops: int,
    device: str,
    precision: str,
    cores: int,
    avx512: bool = True,
    activations: int = 0,
    backend: str = "tensorflow",
) -> float:
    """Seconds per patch from the documented throughputs (``CPU_GFLOPS_PER_CORE``, ``GPU_GFLOPS_BY_BACKEND``).

    On the CPU the time is the larger of the arithmetic and the traffic (``CPU_SECONDS_PER_ACTIVATION``
    per output element): traffic bounds narrow models, arithmetic wide ones such as the seed network.
    """
    if device.startswith("gpu"):
        rates = GPU_GFLOPS_BY_BACKEND.get(backend, GPU_GFLOPS_BY_BACKEND["tensorflow"])
        return flops / (rates[precision] * 1e9)
    cores = max(1, cores)
    rate = (CPU_GFLOPS_PER_CORE if avx512 else CPU_GFLOPS_PER_CORE_NO_AVX512)[precision] * cores
    return max(flops / (rate * 1e9), activations * CPU_SECONDS_PER_ACTIVATION / cores)


def budget_or_default(max_memory: Optional[int]) -> int:
    """``max_memory`` if given, else :func:`default_budget`."""
    return int(max_memory) if max_memory else default_budget()
