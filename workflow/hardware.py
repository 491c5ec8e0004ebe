"""Facts about this machine's CPU that decide precision and that benchmarks record (no torch import)."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# The instruction-set flags that change what is fast on a CPU: fp32 AVX-512, native bf16 dot products, AMX tiles.
RELEVANT_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """All flags /proc/cpuinfo lists for the first CPU (empty where there is no /proc, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 | aarch64
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def relevant_cpu_flags() -> dict[str, bool]:
    """{flag: present} for the flags that matter to training speed, for benchmark provenance."""
    flags = cpu_flags()
    return {f: f in flags for f in RELEVANT_CPU_FLAGS}


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX), so bf16 autocast is faster than fp32.

    Without it PyTorch emulates bf16 matmuls and bf16-mixed is ~26x slower than fp32 (measured here).
    On aarch64 the `bf16` feature flag (ARMv8.6 BF16) plays the same role.
    """
    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)
