"""Facts about this machine's CPU and memory: cores, feature flags, bfloat16 support, physical memory.

The leaf every layer may ask (no framework import, no import from this package):
thread counts default to :func:`cpu_cores`, ``--precision auto`` and ``--mixed-precision auto`` ask
:func:`cpu_has_bf16`, and the memory budget defaults to half of :func:`total_memory`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bfloat16 arithmetic


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask in containers, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where ``/proc/cpuinfo`` does not exist)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_bf16(flags: Optional[frozenset[str]] = None) -> bool:
    """True when the CPU has bfloat16 arithmetic (AVX512-BF16 or AMX-BF16); ``flags``: default this CPU's."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def total_memory() -> int:
    """Physical memory of this machine in bytes (0 where unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0
